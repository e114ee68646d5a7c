"""The experiment's models: the teacher fitted on the task and the warm-started students, by
spec and fitting recipe, cached by name under the cache folder; and the task's splits."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenbridge.research import textcont
from tokenbridge.research.experiment.config import ExperimentConfig
from tokenbridge.research.task import accuracy, split_problems
from tokenbridge.research.taskmodels import FitSpec, StopRule, fit_model, fit_task_model
from tokenbridge.tinymodels import TinyModelSpec


def _teacher_spec(cfg: ExperimentConfig) -> TinyModelSpec:
    return TinyModelSpec(
        tokenizer=cfg.teacher_tokenizer, architecture=cfg.teacher_architecture,
        hidden=cfg.teacher_hidden, layers=cfg.teacher_layers, heads=cfg.teacher_hidden // 32,
        max_positions=256,
    )  # fmt: skip


def _student_spec(cfg: ExperimentConfig, kind: str, seed: int) -> TinyModelSpec:
    tokenizer = cfg.student_tokenizer if kind == "cross" else cfg.teacher_tokenizer
    return TinyModelSpec(
        tokenizer=tokenizer, architecture=cfg.student_architecture, hidden=cfg.student_hidden,
        layers=cfg.student_layers, heads=cfg.student_hidden // 32, max_positions=256, seed=seed,
    )  # fmt: skip


def _model_name(
    spec: TinyModelSpec,
    fit: FitSpec,
    role: str,
    task: str = "arithmetic",
    stop: StopRule | None = None,
) -> str:
    tokenizer = Path(spec.tokenizer).name.replace(".", "")
    return (
        f"{'task' if task == 'arithmetic' else task}-{role}-{spec.architecture}-{tokenizer}"
        f"-h{spec.hidden}-l{spec.layers}"
        f"-s{spec.seed}-f{fit.steps}x{fit.batch_size}"
        + (f"-u{fit.unused_steps}" if fit.unused_steps else "")
        + (f"-c{round(fit.corrupt * 100)}" if fit.corrupt else "")
        + (f"-t{round(stop.target * 100)}e{stop.every}" if stop else "")
    )


def warm_start_stop(cfg: ExperimentConfig, validation: list[Any]) -> StopRule | None:
    """The rule that ends every warm start's fit once its temperature-1 accuracy on the
    ``validation`` problems reaches ``cfg.warm_start_target`` (None: fixed lengths). Sampled as
    the experiment's own validation accuracy is (``seed=2``), so the two read alike."""
    if cfg.warm_start_target is None:
        return None

    def score(model: Any, tokenizer: Any) -> float:
        return accuracy(model, tokenizer, validation, cfg.max_new_tokens, temperature=1.0, seed=2)

    key = {"measure": "validation sampled accuracy", "problems": len(validation),
           "first": [validation[0].a, validation[0].b] if validation else None,
           "max_new_tokens": cfg.max_new_tokens}  # fmt: skip
    return StopRule(score, cfg.warm_start_target, cfg.warm_start_check_every, key)


def warm_start_fit(cfg: ExperimentConfig, kind: str, seed: int) -> FitSpec:
    """How the ``kind`` (``cross`` or ``same``) student of ``seed`` is warm-started."""
    steps = cfg.warm_start_steps
    if kind == "same" and cfg.same_warm_start_steps is not None:
        steps = cfg.same_warm_start_steps
    return FitSpec(
        steps=steps, batch_size=16, learning_rate=3e-3, examples=cfg.warm_start_examples,
        seed=seed, unused_steps=50,
    )  # fmt: skip


def task_split(cfg: ExperimentConfig) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, validation, held out) problems (or text passages): the held-out ones no model
    ever trains on and only the final numbers read; the validation ones, set aside from the
    train problems (a play of their own for text), choose the learning rates; everything fits
    and trains on the rest."""
    if cfg.task == "text":
        return (
            textcont.passages("train", cfg.text_passages, seed=0),
            textcont.passages("validation", cfg.validation_problems, seed=2),
            textcont.passages("held_out", cfg.held_out, seed=1),
        )
    train, held_out = split_problems(cfg.digits, cfg.held_out, seed=0)
    cut = len(train) - cfg.validation_problems
    return train[:cut], train[cut:], held_out


def build_models(
    cfg: ExperimentConfig,
    cache_dir: Path,
    train_problems: list[Any],
    kinds: list[str],
    log: Callable[[str], None] = print,
    validation: list[Any] | None = None,
) -> tuple[Path, dict[tuple[str, int], Path]]:
    """The fitted teacher and every seed's warm-started students of ``kinds`` (``cross``,
    ``same``), fitted here or read from ``cache_dir/models``; with ``cfg.warm_start_target``,
    each warm start is fitted until its accuracy on the ``validation`` problems reaches it."""
    models_dir = cache_dir / "models"
    text = cfg.task == "text"

    def fit_on(
        spec: TinyModelSpec, fit: FitSpec, role: str, desc: str, stop: StopRule | None = None
    ) -> Path:
        folder = models_dir / _model_name(spec, fit, role, cfg.task, stop)
        if not text:
            return fit_task_model(
                spec, fit, train_problems, folder, cache_dir, progress=cfg.progress, desc=desc,
                stop=stop,
            )  # fmt: skip
        chosen = train_problems[: fit.examples] if fit.examples else train_problems
        key = {"task": "text", "count": len(chosen), "seed": 0,
               "set_aside": [*textcont.HELD_OUT_PLAYS, *textcont.VALIDATION_PLAYS]}  # fmt: skip
        return fit_model(
            spec, fit, lambda tokenizer: (textcont.examples(tokenizer, chosen), []), key,
            folder, cache_dir, progress=cfg.progress, desc=desc,
        )  # fmt: skip

    teacher_spec = _teacher_spec(cfg)
    # Text has no planted mistakes; its teacher's unused ids are pushed down as the students'
    # are (prose leaves a wide distribution, where tens of thousands of logit-0 ids add up).
    teacher_fit = (
        FitSpec(steps=cfg.teacher_fit_steps, batch_size=32, unused_steps=50)
        if text
        else FitSpec(steps=cfg.teacher_fit_steps, corrupt=cfg.teacher_corrupt)
    )
    log(f"teacher: {teacher_spec.architecture} over {cfg.teacher_tokenizer}, fitted here")
    teacher_dir = fit_on(teacher_spec, teacher_fit, "teacher", "fit teacher")
    stop = None
    if cfg.warm_start_target is not None:
        if not validation:
            raise ValueError("warm_start_target needs the validation problems")
        stop = warm_start_stop(cfg, validation)
    warm: dict[tuple[str, int], Path] = {}
    for seed in cfg.seeds:
        for kind in kinds:
            spec = _student_spec(cfg, kind, seed)
            fit = warm_start_fit(cfg, kind, seed)
            warm[kind, seed] = fit_on(spec, fit, "student", f"warm start {kind} s{seed}", stop)
            if stop is not None:
                taken, score = warm_start_reached(warm[kind, seed])
                log(
                    f"warm start {kind} s{seed}: {taken} steps, validation accuracy at "
                    f"temperature 1 {score:.3f} (target {stop.target:g})"
                    + ("" if score >= stop.target else " -- short of the target")
                )
    return teacher_dir, warm


def warm_start_reached(model_dir: Path) -> tuple[int, float]:
    """(steps taken, stop score) of a warm start fitted under a stop rule, from its config;
    (0, nan) for one fitted to a fixed length."""
    config = json.loads((model_dir / "config.json").read_text())
    return (
        int(config.get("tokenbridge_fit_steps_taken", 0)),
        float(config.get("tokenbridge_fit_stop_score", math.nan)),
    )
