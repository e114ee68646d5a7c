"""The exact per-position reverse KL of a student to a teacher, across tokenizers: the yardstick
of whether a distillation step helped (the regression test, ``bench/learning.py``).

On fixed student completions, at every student position ``j``, with the student's full row ``q_j``
over its vocabulary and the teacher's distribution ``p_j`` of the student's next token (§4 of
``docs/mapping.md`` applied to the teacher's *full* row, so nothing is lost to a top-K):

``KL_j = Σ_v q_j(v) (log q_j(v) − log p̃_j(v))``, ``p̃ = max(p, eps) / Σ max(p, eps)``; the
forward KL ``Σ_v p̃_j(v) (log p̃_j(v) − log q_j(v))`` on request (what the forward-KL loss
optimises).

With identical tokenizers ``p_j`` is the teacher's own row. Mass §4 leaves unresolved (a student
token crossing a teacher boundary off the actual path) is left out before the floor. Nothing here
goes through the service, the client or the losses: models are run directly, so the measure is
independent of what it checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenbridge.client.config import DEFAULT_TEACHER_SUPPORT

__all__ = [
    "ExactReverseKL",
    "StepCheck",
    "TeacherTargets",
    "exact_reverse_kl",
    "reverse_kl_to",
    "teacher_targets",
]


@dataclass(frozen=True)
class ExactReverseKL:
    """Per sequence, the per-position reverse KLs (nats); their mean over every position."""

    per_position: list[np.ndarray]

    @property
    def mean(self) -> float:
        """Mean over all positions of all sequences."""
        values = np.concatenate(self.per_position) if self.per_position else np.zeros(0)
        return float(values.mean()) if len(values) else float("nan")


class _Pair:
    """The teacher's side: its model, tokenizer and the pair's mapper (built once)."""

    def __init__(self, teacher_dir: Path, student_tokenizer: Any, cache_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tokenbridge.shared.cache import TableCache
        from tokenbridge.shared.mapping import PairMapper

        self.tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
        self.model.eval()
        tables = TableCache(cache_dir / "tables")
        teacher_vocab = tables.vocab(self.tokenizer, str(teacher_dir))
        student_name = getattr(student_tokenizer, "name_or_path", "") or "student"
        student_vocab = tables.vocab(student_tokenizer, student_name)
        self.mapper = PairMapper(
            teacher_vocab, student_vocab, tables.pair_table(teacher_vocab, student_vocab)
        )


_PAIRS: dict[tuple[str, int], _Pair] = {}


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's side of the measure for fixed completions, computed once: per sequence the
    student's prompt ids, its completion, the student positions kept (§3-scored ones) and the
    floored teacher distribution over the student's vocabulary there, ``log p̃`` (``rows × V``)."""

    prompt_ids: list[list[int]]
    completions: list[list[int]]
    rows: list[np.ndarray]
    log_p: list[np.ndarray]


def teacher_targets(
    student_tokenizer: Any,
    student_vocab_size: int,
    teacher_dir: Path | str,
    prompts: list[str],
    completions: list[list[int]],
    cache_dir: Path,
    eps: float = 1e-6,
) -> TeacherTargets:
    """The floored teacher distributions ``p̃`` of the student's next token at every position of
    ``completions`` (see the module docstring); sequences holding bytes the teacher cannot spell
    are left out."""
    import torch

    from tokenbridge.client.rollout import render_student_prompt
    from tokenbridge.shared.align import GAP_ID, align, teacher_view, token_widths
    from tokenbridge.shared.mapping import TeacherScores

    key = (str(teacher_dir), id(student_tokenizer))
    pair = _PAIRS.get(key)
    if pair is None:
        pair = _PAIRS[key] = _Pair(Path(teacher_dir), student_tokenizer, cache_dir)
    mapper = pair.mapper
    out = TeacherTargets([], [], [], [])
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion:
            continue
        ids = np.asarray(completion, dtype=np.int64)
        view = teacher_view(ids, mapper.student, pair.tokenizer, mapper.teacher, mapper.special_map)
        if (view.ids == GAP_ID).any():
            continue  # bytes the teacher cannot spell: no exact answer there
        teacher_prompt = pair.tokenizer.encode(prompt, add_special_tokens=True) or [
            pair.tokenizer.bos_token_id or pair.tokenizer.eos_token_id
        ]
        sequence = torch.tensor([list(teacher_prompt) + view.ids.tolist()])
        with torch.no_grad():
            logits = pair.model(input_ids=sequence).logits[0].double()
        start = len(teacher_prompt) - 1
        log_p_MV = torch.log_softmax(logits[start : start + len(view.ids)], -1).numpy()
        rows = np.arange(len(ids))
        if mapper.same_vocab:
            p_TV = np.zeros((len(ids), student_vocab_size))
            width = min(student_vocab_size, log_p_MV.shape[1])
            p_TV[:, :width] = np.exp(log_p_MV[:, :width])
        else:
            order_MV = np.argsort(-log_p_MV, axis=1)
            scores = TeacherScores(
                topk_ids_TK=order_MV,
                topk_logprobs_TK=np.take_along_axis(log_p_MV, order_MV, axis=1),
                actual_logprobs_T=log_p_MV[np.arange(len(view.ids)), view.ids],
            )
            alignment = align(token_widths(mapper.student, ids), view.widths)
            mapped = mapper.map(ids, view.ids, alignment, scores, mapper.student.size)
            p_TV = np.zeros((len(ids), student_vocab_size))
            hit, cols = np.nonzero(mapped.topk_ids_SK >= 0)
            targets = mapped.topk_ids_SK[hit, cols]
            keep = targets < student_vocab_size
            mass = np.exp(mapped.topk_logprobs_SK[hit, cols].astype(np.float64))
            np.add.at(p_TV, (hit[keep], targets[keep]), mass[keep])
            rows = np.flatnonzero(mapped.scored_S)
            p_TV = p_TV[rows]
        floored_TV = np.maximum(p_TV, eps)
        floored_TV /= floored_TV.sum(axis=1, keepdims=True)
        out.prompt_ids.append(render_student_prompt(student_tokenizer, prompt))
        out.completions.append(list(completion))
        out.rows.append(rows)
        out.log_p.append(np.log(floored_TV))
    return out


def reverse_kl_to(
    model: Any, targets: TeacherTargets, grad: bool = False, direction: str = "reverse"
) -> Any:
    """``KL(q ‖ p̃)`` of ``model`` at every kept position of ``targets`` (``direction="forward"``:
    ``KL(p̃ ‖ q)``, what the forward-KL loss optimises), as one 1-D tensor (with the graph when
    ``grad``, for the exact gradient beside an estimate)."""
    import torch

    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', not {direction!r}")

    from tokenbridge.client.rollout import completion_logprobs

    values = []
    with torch.set_grad_enabled(grad):
        for prompt_ids, completion, rows, log_p in zip(
            targets.prompt_ids, targets.completions, targets.rows, targets.log_p, strict=True
        ):
            _, _, log_q_BTV = completion_logprobs(model, [prompt_ids], [completion], full=True)
            assert log_q_BTV is not None
            log_q = log_q_BTV[0, torch.as_tensor(rows)].double()
            log_p_t = torch.as_tensor(log_p)
            if direction == "reverse":
                values.append((log_q.exp() * (log_q - log_p_t)).sum(-1))
            else:
                values.append((log_p_t.exp() * (log_p_t - log_q)).sum(-1))
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def exact_reverse_kl(
    model: Any, targets: TeacherTargets, direction: str = "reverse"
) -> ExactReverseKL:
    """The exact per-position reverse KL of ``model`` on ``targets`` (eval mode, no graph;
    ``direction="forward"``: the forward KL ``KL(p̃ ‖ q)`` instead)."""
    was_training = model.training
    model.eval()
    try:
        values = reverse_kl_to(model, targets, direction=direction).numpy()
    finally:
        if was_training:
            model.train()
    sizes = np.cumsum([len(rows) for rows in targets.rows])[:-1]
    return ExactReverseKL(list(np.split(values, sizes)))


class StepCheck:
    """The experiment's fitted teacher served as its own process, and its warm-started students
    (``same``: on the teacher's tokenizer, ``cross``: on another family's): train a copy of a
    student for a few steps with the real trainer and measure the exact reverse KL before and
    after on fixed completions of validation problems (train problems the trainer never sees;
    the held-out test problems are not touched)."""

    def __init__(self, stack: Any, url: str, folder: Path, cache_dir: Path, teacher_dir: Path,
                 students: dict[str, Path], prompts_path: Path, validation: list[str],
                 max_new_tokens: int) -> None:  # fmt: skip
        self._stack = stack
        self.url = url
        self.folder = folder
        self.cache_dir = cache_dir
        self.teacher_dir = teacher_dir
        self.students = students
        self.prompts_path = prompts_path
        self.validation = validation
        self.max_new_tokens = max_new_tokens
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._runs = 0

    @classmethod
    def start(
        cls,
        cfg: Any,
        cache_dir: Path,
        folder: Path,
        pairs: list[str],
        seed: int = 0,
    ) -> StepCheck:
        """Fit or load the models of experiment config ``cfg`` and start the service."""
        import contextlib
        import json

        from tokenbridge.process import serve_process
        from tokenbridge.research.experiment import build_models, task_split

        train, validation, _ = task_split(cfg)
        teacher_dir, warm = build_models(
            cfg, cache_dir, train, sorted(set(pairs)), log=lambda _: None
        )
        prompts_path = folder / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in train))
        stack = contextlib.ExitStack()
        env = {"OMP_NUM_THREADS": "1", "TOKENBRIDGE_CACHE": str(cache_dir)}
        url, _, _ = stack.enter_context(
            serve_process(
                ["--teacher", str(teacher_dir), "--data-dir", str(folder / "service"),
                 "--log-level", "warning", "--max-top-k", str(DEFAULT_TEACHER_SUPPORT)],
                folder, env=env,
            )
        )  # fmt: skip
        students = {pair: warm[pair, seed] for pair in pairs}
        return cls(stack, url, folder, cache_dir, teacher_dir, students, prompts_path,
                   [p.prompt for p in validation], cfg.max_new_tokens)  # fmt: skip

    def student(self, pair: str) -> tuple[Any, Any]:
        """The warm start of ``pair``: (tokenizer, model), loaded once."""
        if pair not in self._loaded:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(self.students[pair])
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            self._loaded[pair] = (AutoTokenizer.from_pretrained(path), model.eval())
        return self._loaded[pair]

    def validation_completions(self, pair: str, count: int, seed: int = 1234) -> TeacherTargets:
        """The warm start's own samples (temperature 1, seeded) of ``count`` validation prompts,
        with the teacher's distributions there: the fixed states every measurement of ``pair``
        runs on."""
        from tokenbridge.client.rollout import sample

        tokenizer, model = self.student(pair)
        prompts = self.validation[:count]
        rollout = sample(
            model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, generator_seed=seed
        )
        return teacher_targets(
            tokenizer, model.config.vocab_size, self.teacher_dir, prompts,
            rollout.completion_ids, self.cache_dir,
        )  # fmt: skip

    def exact(
        self, pair: str, model: Any | None, targets: TeacherTargets, direction: str = "reverse"
    ) -> float:
        """Mean exact per-position reverse KL of ``model`` (None: the warm start) to the teacher
        on ``targets`` (``direction="forward"``: the forward KL)."""
        student = model if model is not None else self.student(pair)[1]
        return exact_reverse_kl(student, targets, direction).mean

    def train(self, pair: str, **overrides: Any) -> Any:
        """A copy of ``pair``'s warm start after ``tokenbridge train`` with ``overrides`` (its
        defaults otherwise; no evaluation), loaded from the run's checkpoint."""
        import torch
        from transformers import AutoModelForCausalLM

        from tokenbridge.client.config import TrainConfig
        from tokenbridge.client.lora import merged, with_adapters
        from tokenbridge.client.train import main

        self._runs += 1
        out_dir = self.folder / f"run-{self._runs}"
        settings: dict[str, Any] = {
            "student": str(self.students[pair]), "teacher_urls": (self.url,),
            "prompts": self.prompts_path, "eval_prompts": 0, "max_new_tokens": self.max_new_tokens,
            "out_dir": out_dir, "progress": False, **overrides,
        }  # fmt: skip
        settings.setdefault("checkpoint_every", settings.get("steps", 20))
        summary = main(TrainConfig(**settings))
        model = AutoModelForCausalLM.from_pretrained(str(self.students[pair]), dtype=torch.float32)
        state = torch.load(summary.checkpoint_path, weights_only=False)
        if state.get("lora"):  # a LoRA run: its adapters, merged into the warm start
            model = with_adapters(model, state["lora"])
            model.load_state_dict(state["model"])
            return merged(model).eval()
        model.load_state_dict(state["model"])
        return model.eval()

    def close(self) -> None:
        """Stop the service."""
        self._stack.close()
