"""Benchmark of the token mapping against a seed-style (paper) alignment.

For each (teacher, student) pair: a student completion of real text (Shakespeare, from the
``shakespeare`` package's ``shksprdata/texts``), its teacher view, synthetic teacher scores
(``tests/synthetic.py``), then timings of the vocabulary and pair-table builds, a table load from
the on-disk cache, the §2+§3 path (``align`` + ``PairMapper.telescoped``), the full §4 mapping
(``PairMapper.map``) and the seed-style decode-and-compare alignment with its semantic-prior
targets (``bench/seed_style.py``).

Run ``python bench/mapping.py``. One JSON line per pair goes to stderr as it completes; the last
line of stdout is ``{"benchmark": "mapping", "machine": ..., "pairs": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# Plain imports of the sibling module and the tests' helpers, whatever the working directory.
for _extra in (REPO_ROOT / "tests", REPO_ROOT / "bench"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

from seed_style import SeedChunk, seed_align_and_targets  # noqa: E402
from synthetic import PrefixNeighbours, synthetic_scores  # noqa: E402

from tokenbridge.corpus import shakespeare_dir  # noqa: E402
from tokenbridge.hub import load_tokenizer  # noqa: E402
from tokenbridge.shared.align import (  # noqa: E402
    align,
    encode_continuation,
    teacher_view,
    token_widths,
)
from tokenbridge.shared.cache import TableCache  # noqa: E402
from tokenbridge.shared.mapping import PairMapper  # noqa: E402
from tokenbridge.shared.tables import PairTable, StudentTrie, build_pair_table  # noqa: E402
from tokenbridge.shared.vocab import Vocab, build_vocab  # noqa: E402

#: (teacher, student) offline tokenizer names.
PAIRS = (("qwen3.6", "llama3"), ("gpt2", "mistral-v1"))

#: Where the completion text comes from, and where in it to start (the play proper).
TEXT_FILE = "hamlet_gut.txt"
TEXT_START_MARKER = "ACT I."

TARGETS = {
    "speedup_min": 20.0,
    "ours_aligned_share": 1.0,
    "sparse_positions_per_s_min": 200_000.0,
    "table_build_s_max": 10.0,
    "table_load_s_max": 1.0,
}


def log(message: str) -> None:
    """A progress message on stderr."""
    print(f"[bench.mapping] {message}", file=sys.stderr, flush=True)


def shakespeare_text(name: str = TEXT_FILE) -> str:
    """The text of one play from the ``shakespeare`` package's data (``shksprdata/texts``)."""
    text = (shakespeare_dir() / name).read_text(encoding="utf-8")
    start = text.find(TEXT_START_MARKER)
    return text[start:] if start >= 0 else text


def best_of(function: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``function`` (after one untimed warm-up call)."""
    function()
    best = float("inf")
    for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def machine_info() -> dict[str, Any]:
    """What ran the benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def build_table_timed(teacher: Vocab, student: Vocab) -> tuple[PairTable, float]:
    """Build the pair table from fresh vocabularies (trie included); return it and its time."""
    started = time.perf_counter()
    trie = StudentTrie.from_vocab(student)
    table = build_pair_table(teacher, student, trie)
    return table, time.perf_counter() - started


def load_table_timed(teacher: Vocab, student: Vocab, table: PairTable) -> float:
    """Store ``table`` in a fresh temporary cache; time ``TableCache.pair_table`` loading it."""
    with tempfile.TemporaryDirectory(prefix="tokenbridge-bench-") as root:
        TableCache(root).save_pair_table(table)
        started = time.perf_counter()
        loaded = TableCache(root).pair_table(teacher, student)
        elapsed = time.perf_counter() - started
    same = all(
        np.array_equal(getattr(loaded, field), getattr(table, field))
        for field in ("student_id", "match_len", "crosses")
    )
    if not same:
        raise RuntimeError("the table loaded from the cache differs from the one stored")
    return elapsed


def seed_in_place_share(
    chunks: list[SeedChunk], student_widths: np.ndarray, teacher_widths: np.ndarray, n: int
) -> float:
    """Share of student tokens in seed-style chunks whose two sides span the same bytes.

    The seed-style aligner matches decoded text, not positions: after a give-up its pointers can
    drift apart, and a later chunk can match equal text at two different places of the completion.
    """
    student_edges = np.concatenate([[0], np.cumsum(student_widths)])
    teacher_edges = np.concatenate([[0], np.cumsum(teacher_widths)])
    in_place = 0
    for s0, s1, t0, t1 in chunks:
        if student_edges[s0] == teacher_edges[t0] and student_edges[s1] == teacher_edges[t1]:
            in_place += s1 - s0
    return in_place / n if n else 1.0


def bench_pair(
    teacher_name: str, student_name: str, args: argparse.Namespace, text: str
) -> dict[str, Any]:
    """All measurements for one (teacher, student) pair."""
    pair = f"{teacher_name} -> {student_name}"
    log(f"{pair}: loading tokenizers")
    teacher_tok = load_tokenizer(teacher_name, args.cache_dir)
    student_tok = load_tokenizer(student_name, args.cache_dir)

    started = time.perf_counter()
    teacher = build_vocab(teacher_tok, teacher_name)
    student = build_vocab(student_tok, student_name)
    vocab_build_s = time.perf_counter() - started

    log(f"{pair}: building the pair table")
    table, table_build_s = build_table_timed(teacher, student)
    table_load_s = load_table_timed(teacher, student, table)

    log(f"{pair}: encoding a {args.tokens}-token completion")
    # Enough characters for the requested tokens at any plausible rate (≥ 1 char per token).
    student_ids = np.asarray(
        encode_continuation(student_tok, student, text[: args.tokens * 12]), dtype=np.int64
    )[: args.tokens]
    if len(student_ids) < args.tokens:
        raise SystemExit(f"the text gives only {len(student_ids)} {student_name} tokens")
    view = teacher_view(student_ids, student, teacher_tok, teacher)
    rng = np.random.default_rng(args.seed)
    scores = synthetic_scores(teacher, view.ids, args.top_k, rng, PrefixNeighbours(teacher))
    student_logprobs = np.log(rng.uniform(0.02, 1.0, size=len(student_ids)))

    mapper = PairMapper(teacher, student, table)
    _ = teacher.prefix_hashes, student.prefix_hashes  # cached properties, outside the timings

    def ours() -> Any:
        alignment = align(token_widths(student, student_ids), view.widths)
        return alignment, mapper.telescoped(alignment, view.ids, scores)

    def full_map() -> Any:
        alignment = align(token_widths(student, student_ids), view.widths)
        return mapper.map(
            student_ids, view.ids, alignment, scores, args.top_k, untiled_bytes=view.untiled_bytes
        )

    log(f"{pair}: timing align + telescoped ({args.repeats} repeats)")
    ours_s = best_of(ours, args.repeats)
    alignment, telescoped = ours()
    report = alignment.report(view.untiled_bytes)

    log(f"{pair}: timing the full sparse map (top-{args.top_k}, {args.repeats} repeats)")
    map_s = best_of(full_map, args.repeats)

    log(f"{pair}: seed-style alignment + semantic-prior targets (one run)")
    started = time.perf_counter()
    seed = seed_align_and_targets(
        student_ids, view.ids, student_tok, teacher_tok, scores.actual_logprobs_T, student_logprobs
    )
    seed_s = time.perf_counter() - started
    seed_in_place = seed_in_place_share(
        seed.chunks, token_widths(student, student_ids), view.widths, len(student_ids)
    )

    n = len(student_ids)
    ours_tps = n / ours_s
    seed_tps = n / seed_s
    result = {
        "pair": pair,
        "completion_tokens": n,
        "teacher_tokens": len(view.ids),
        "untiled_bytes": view.untiled_bytes,
        "chunks": report.chunks,
        "one_to_one_share": round(report.one_to_one_share, 4),
        "longest_chunk_tokens": report.longest_chunk_tokens,
        "vocab_build_s": round(vocab_build_s, 3),
        "table_build_s": round(table_build_s, 3),
        "table_load_s": round(table_load_s, 4),
        "ours_tokens_per_s": round(ours_tps),
        "seed_style_tokens_per_s": round(seed_tps),
        "speedup": round(ours_tps / seed_tps, 1),
        "ours_aligned_share": round(float(np.isfinite(telescoped.logprobs_S).mean()), 4),
        "seed_style_aligned_share": round(float(seed.aligned.mean()), 4),
        "seed_style_chunks": seed.num_chunks,
        "seed_style_in_place_share": round(seed_in_place, 4),
        "sparse_positions_per_s": round(n / map_s),
        "repeats": args.repeats,
    }
    result["meets_targets"] = {
        "speedup": result["speedup"] >= TARGETS["speedup_min"],
        "ours_aligned_share": result["ours_aligned_share"] == TARGETS["ours_aligned_share"],
        "sparse_positions_per_s": (
            result["sparse_positions_per_s"] >= TARGETS["sparse_positions_per_s_min"]
        ),
        "table_build_s": table_build_s < TARGETS["table_build_s_max"],
        "table_load_s": table_load_s < TARGETS["table_load_s_max"],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark over ``PAIRS`` and print the JSON summary as the last stdout line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO_ROOT / ".cache",
        help="where offline tokenizers are materialised (default: .cache in the repository)",
    )
    parser.add_argument("--tokens", type=int, default=4000, help="student completion length")
    parser.add_argument("--top-k", type=int, default=20, help="teacher top-K and mapped top-K")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (best is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scores")
    args = parser.parse_args(argv)

    text = shakespeare_text()
    pairs = []
    for teacher_name, student_name in PAIRS:
        result = bench_pair(teacher_name, student_name, args, text)
        print(json.dumps(result), file=sys.stderr, flush=True)
        pairs.append(result)
    summary = {"benchmark": "mapping", "machine": machine_info(), "pairs": pairs}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
