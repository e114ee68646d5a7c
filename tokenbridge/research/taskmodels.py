"""Tiny models trained here on the arithmetic task: the experiment's teacher and the students'
common warm start.

A model is built by ``tinymodels.build_tiny_model`` over a real tokenizer, then fitted on worked
solutions (loss on the completion only). Fitting is cached: a folder that already holds a model
fitted with the same settings is reused, so reruns skip it.

Why the output layer is cheap here: the task uses a few hundred of a tokenizer's 32k–50k ids.
Rows of the (tied) embedding that the task never uses are set to zero before fitting and are
never updated, so each of those ids always has logit 0 and the exact full-vocabulary softmax is
the softmax over the used ids plus one extra logit, ``log(unused count)``. Fitting costs what a
300-token vocabulary costs, and the result is an ordinary model over the whole vocabulary.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.research.task import Problem, corrupted_example, student_example
from tokenbridge.shared.cache import folder_in_place
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

__all__ = ["Example", "FitSpec", "StopRule", "fit_model", "fit_task_model"]

_FIT_FILE = "tokenbridge-fit.json"


@dataclass(frozen=True)
class FitSpec:
    """How a tiny model is fitted on worked solutions."""

    steps: int = field(default=1200, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate (one-cycle)"})
    examples: int = field(default=0, metadata={"help": "train problems used (0: all)"})
    seed: int = field(default=0, metadata={"help": "data order seed"})
    unused_steps: int = field(
        default=0,
        metadata={"help": "steps that then push the unused ids' logits down (output rows only)"},
    )
    corrupt: float = field(
        default=0.0,
        metadata={
            "help": "share of examples whose steps carry one wrong digit, with loss only on the "
            "correct rest (a teacher that knows the right next step off its own traces)"
        },
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or min(self.examples, self.unused_steps) < 0:
            raise ValueError("steps and batch_size must be >= 1, examples and unused_steps >= 0")
        if not 0.0 <= self.corrupt <= 1.0:
            raise ValueError("corrupt must lie in [0, 1]")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")


Example = tuple[list[int], list[int], int]


@dataclass(frozen=True)
class StopRule:
    """End a fit early: every ``every`` steps the model as it stands (its unused ids pushed down
    on a copy, as the finished model's are) is scored by ``score(model, tokenizer)``, and the
    first copy scoring ``target`` or more is the fitted model; ``FitSpec.steps`` is then the
    longest fit. ``key`` (JSON) names the score for the cache: a model stopped by another rule
    is not reused.

    Why: students of different seeds fitted for the same steps end far apart (in the full run of
    2026-12-03 one seed's warm start was right 0.32 of the time greedily, another's 0.99), so a
    fixed length cannot match them; a threshold on the measure they are matched on can.
    """

    score: Callable[[Any, Any], float]
    target: float
    every: int
    key: Any

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("StopRule.every must be at least 1")


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[Any, Any, Any]:
    """Padded ids, attention mask and labels; an example's loss starts at its third item (the
    first completion token after a planted mistake; 0 for a clean one)."""
    import torch

    width = max(len(p) + len(c) for p, c, _ in examples)
    ids_BL = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels_BL = torch.full((len(examples), width), -100, dtype=torch.long)
    mask_BL = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (prompt, completion, loss_from) in enumerate(examples):
        sequence = prompt + completion
        ids_BL[b, : len(sequence)] = torch.tensor(sequence)
        mask_BL[b, : len(sequence)] = 1
        labels_BL[b, len(prompt) + loss_from : len(sequence)] = torch.tensor(completion[loss_from:])
    return ids_BL, mask_BL, labels_BL


def fit_task_model(
    spec: TinyModelSpec,
    fit: FitSpec,
    problems: Sequence[Problem],
    folder: Path | str,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    desc: str = "fit",
    stop: StopRule | None = None,
) -> Path:
    """Build the model ``spec`` describes and fit it on ``problems``; save it to ``folder``
    (ending early where ``stop`` says so).

    Returns ``folder``. Skipped when ``folder`` already holds a model fitted with the same
    settings on the same problems; written to a temporary folder renamed into place, so a crash
    never leaves half a model behind.
    """
    chosen = list(problems[: fit.examples] if fit.examples else problems)

    def examples(tokenizer: Any) -> tuple[list[Example], list[Example]]:
        clean: list[Example] = [(*student_example(tokenizer, p), 0) for p in chosen]
        corrupted: list[Example] = []
        if fit.corrupt:
            rng = random.Random(fit.seed + 1)
            corrupted = [corrupted_example(tokenizer, p, rng) for p in chosen]
        return clean, corrupted

    return fit_model(
        spec,
        fit,
        examples,
        [[p.a, p.b] for p in chosen],
        folder,
        cache_dir,
        progress,
        desc,
        stop,
    )


def fit_model(
    spec: TinyModelSpec,
    fit: FitSpec,
    examples: Callable[[Any], tuple[list[Example], list[Example]]],
    data_key: Any,
    folder: Path | str,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    desc: str = "fit",
    stop: StopRule | None = None,
) -> Path:
    """Build the model ``spec`` describes and fit it on ``examples(tokenizer)`` (clean examples,
    and the corrupted pool ``fit.corrupt`` draws from); save it to ``folder``. With ``stop``, the
    fit ends at the first check that reaches its target; the steps taken and the last score are
    in the saved config (``tokenbridge_fit_steps_taken``, ``tokenbridge_fit_stop_score``).

    ``data_key`` (JSON) names the data: the fit is skipped when ``folder`` already holds a model
    fitted with the same settings on the same data. Written to a temporary folder renamed into
    place, so a crash never leaves half a model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    # A field at its default that older fits lacked is left out, so their caches stay valid.
    fit_settings = {
        k: v for k, v in asdict(fit).items() if k not in ("unused_steps", "corrupt") or v
    }
    settings = {"model": asdict(spec), "fit": fit_settings, "problems": data_key}
    if stop is not None:
        settings["stop"] = {"target": stop.target, "every": stop.every, "score": stop.key}
    marker = folder / _FIT_FILE
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return folder
    with (
        folder_in_place(folder) as out,
        tempfile.TemporaryDirectory(prefix=f".{folder.name}-init-", dir=out.parent) as scratch,
    ):
        init = Path(scratch) / "init"
        build_tiny_model(spec, init, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(init))
        model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
        clean, corrupted = examples(tokenizer)
        model = _fit(model, tokenizer, clean, corrupted, fit, progress, desc, stop)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        (out / _FIT_FILE).write_text(json.dumps(settings))
    return folder


def _fit(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    corrupted: list[Example],
    fit: FitSpec,
    progress: bool,
    desc: str,
    stop: StopRule | None = None,
) -> Any:
    """Fit ``model`` as ``fit`` says; the fitted model (a pushed-down copy where ``stop`` ended
    the fit)."""
    import copy

    import torch
    from tqdm import tqdm

    torch.manual_seed(fit.seed)
    weight_VD = model.get_output_embeddings().weight
    if model.get_input_embeddings().weight is not weight_VD:
        raise ValueError("fit_task_model needs tied input and output embeddings")
    vocab = weight_VD.shape[0]
    used = sorted(
        {i for prompt, completion, _ in [*examples, *corrupted] for i in prompt + completion}
    )
    used_U = torch.tensor(used)
    with torch.no_grad():
        kept_UD = weight_VD[used_U].clone()
        weight_VD.zero_()
        weight_VD[used_U] = kept_UD
    # Position of each id among the used ones; unused ids are never targets.
    index_V = torch.full((vocab,), -100, dtype=torch.long)
    index_V[used_U] = torch.arange(len(used))
    log_unused = math.log(max(1, vocab - len(used)))
    optimiser = torch.optim.AdamW(model.parameters(), lr=fit.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=fit.learning_rate, total_steps=fit.steps, pct_start=0.1
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = random.Random(fit.seed)
    model.train()
    bar = tqdm(total=fit.steps, desc=desc, unit="step", disable=not progress, mininterval=1.0)
    started = time.perf_counter()

    def draw() -> Example:
        pool = corrupted if corrupted and order.random() < fit.corrupt else examples
        return pool[order.randrange(len(pool))]

    def checked(step: int) -> tuple[Any, float]:
        """A finished copy of the model at ``step`` and its score under the stop rule."""
        assert stop is not None
        candidate = copy.deepcopy(model)
        if fit.unused_steps:
            _push_down_unused(candidate, examples, used_U, fit, pad_id, random.Random(step))
        candidate.eval()
        score = float(stop.score(candidate, tokenizer))
        candidate.config.tokenbridge_fit_steps_taken = step
        candidate.config.tokenbridge_fit_stop_score = score
        bar.set_postfix(score=f"{score:.3f}", refresh=False)
        return candidate, score

    for step in range(1, fit.steps + 1):
        bar.update(1)
        ids_BL, mask_BL, labels_BL = _batch([draw() for _ in range(fit.batch_size)], pad_id)
        hidden_BLD = model.base_model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        logits_BLU = hidden_BLD[:, :-1] @ weight_VD[used_U].T
        unused_BL1 = torch.full_like(logits_BLU[..., :1], log_unused)
        logits_BLX = torch.cat([logits_BLU, unused_BL1], dim=-1)
        labels = labels_BL[:, 1:]
        targets_BL = torch.where(labels >= 0, index_V[labels.clamp(min=0)], -100)
        loss = torch.nn.functional.cross_entropy(
            logits_BLX.reshape(-1, logits_BLX.shape[-1]), targets_BL.reshape(-1)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        if stop is not None and (step % stop.every == 0 or step == fit.steps):
            # Short of the target after the longest fit, the last check's copy is the model: it
            # carries its score, which the caller reports.
            candidate, score = checked(step)
            if score >= stop.target or step == fit.steps:
                bar.close()
                candidate.config.tokenbridge_fit_seconds = round(time.perf_counter() - started, 1)
                return candidate
    bar.close()
    if fit.unused_steps:
        _push_down_unused(model, examples, used_U, fit, pad_id, order)
    model.eval()
    model.config.tokenbridge_fit_seconds = round(time.perf_counter() - started, 1)
    return model


def _push_down_unused(
    model: Any,
    examples: list[Example],
    used_U: Any,
    fit: FitSpec,
    pad_id: int,
    order: random.Random,
) -> None:
    """Train only the unused ids' output rows, over the full vocabulary, with the rest frozen.

    Zero rows give every unused id logit 0, and tens of thousands of them together keep real
    mass wherever the model is unsure: sampled at temperature 1, a weakly fitted model then
    writes junk tokens (a pretrained model gives them almost nothing). A few steps of full
    cross-entropy on those rows alone move them against the hidden states the task produces.
    """
    import torch

    weight_VD = model.get_output_embeddings().weight
    keep_V = torch.zeros(weight_VD.shape[0], dtype=torch.bool)
    keep_V[used_U] = True
    optimiser = torch.optim.Adam([weight_VD], lr=1e-2)
    for _ in range(fit.unused_steps):
        ids_BL, mask_BL, labels_BL = _batch(
            [examples[order.randrange(len(examples))] for _ in range(fit.batch_size)], pad_id
        )
        with torch.no_grad():
            hidden_BLD = model.base_model(input_ids=ids_BL, attention_mask=mask_BL)
            hidden_BLD = hidden_BLD.last_hidden_state[:, :-1]
        logits_BLV = hidden_BLD @ weight_VD.T
        loss = torch.nn.functional.cross_entropy(
            logits_BLV.reshape(-1, logits_BLV.shape[-1]), labels_BL[:, 1:].reshape(-1)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        weight_VD.grad[keep_V] = 0  # the used rows (and so the task) stay as fitted
        optimiser.step()
