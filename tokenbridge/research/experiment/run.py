"""Running the experiment: the teacher service as its own process, each arm's learning rate chosen
on the validation split, every (arm, seed) trained through the real client (finished runs
reused), evaluated on the held-out split, and the results written."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokenbridge.client.config import DEFAULT_TEACHER_SUPPORT
from tokenbridge.research import textcont
from tokenbridge.research.experiment.config import (
    ARMS,
    HEADLINES,
    SELECTION_MEASURES,
    ExperimentConfig,
    ExperimentResult,
)
from tokenbridge.research.experiment.models import build_models, task_split, warm_start_reached
from tokenbridge.research.experiment.results import (
    POINT_KEYS,
    plot_results,
    results_table,
    summarise,
)
from tokenbridge.research.task import accuracy, bits_per_byte, parse_answer


def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Run every arm for every seed (reusing finished runs) and write the results."""

    from tokenbridge.process import serve_process

    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    train_problems, validation, held_out = task_split(cfg)
    eval_set = held_out[: cfg.eval_problems]
    kl_prompts = [p.prompt for p in held_out[: cfg.kl_eval_prompts]]

    kinds = sorted({ARMS[a].student for a in cfg.arms})
    teacher_dir, warm = build_models(cfg, cache_dir, train_problems, kinds, log, validation)

    prompts_path = out_dir / "prompts.jsonl"
    # The trainer holds out its first ``eval_prompts`` lines: the reverse-KL prompts come first.
    lines = kl_prompts + [p.prompt for p in train_problems]
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))

    # The service gets one thread: it is idle most of the time, and while it scores the student
    # keeps sampling, so two busy processes never fight over more threads than cores.
    env = {"OMP_NUM_THREADS": "1", "TOKENBRIDGE_CACHE": str(cache_dir)}
    max_top_k = max(cfg.top_k, DEFAULT_TEACHER_SUPPORT)
    serve_args = ["--teacher", str(teacher_dir), "--data-dir", str(out_dir / "service"),
                  "--log-level", "warning", "--max-top-k", str(max_top_k)]  # fmt: skip
    log("starting the teacher service (its own process) ...")
    with serve_process(serve_args, out_dir, env=env) as (url, _, service_log):
        log(f"teacher service ready at {url} (log: {service_log})")
        if cfg.task == "text":
            teacher = _text_teacher_quality(teacher_dir, eval_set)
            log(
                f"teacher on {len(eval_set)} held-out passages: "
                f"{teacher['bits_per_byte']:.3f} bits/byte, next-token accuracy "
                f"{teacher['next_token_accuracy']:.1%}"
            )
        else:
            teacher = _teacher_quality(url, cfg, eval_set)
            log(
                f"teacher accuracy on {len(eval_set)} held-out problems: "
                f"{teacher['accuracy']:.1%} ({teacher['sampled_accuracy']:.1%} sampled at "
                f"temperature 1); after a planted wrong digit: "
                f"{teacher['accuracy_after_error']:.1%}"
            )
        teacher_texts = teacher.pop("texts", None)

        def text_metrics(model: Any, tokenizer: Any, validate: bool) -> dict[str, float]:
            out = textcont.text_quality(model, tokenizer, eval_set)
            if validate:  # validation bits per byte choose the learning rate
                out["val_bits_per_byte"] = textcont.text_quality(model, tokenizer, validation)[
                    "bits_per_byte"
                ]
            return out

        def task_metrics(model: Any, tokenizer: Any, validate: bool = False) -> dict[str, float]:
            """The held-out measures; with ``validate`` the validation ones too (only the
            learning-rate trials' last points need them)."""
            if cfg.task == "text":
                return text_metrics(model, tokenizer, validate)
            right = accuracy(model, tokenizer, eval_set, cfg.max_new_tokens)
            bits, bits_se = bits_per_byte(
                model, tokenizer, [p.prompt for p in eval_set], teacher_texts, with_error=True
            )
            sampled = accuracy(
                model, tokenizer, eval_set, cfg.max_new_tokens, temperature=1.0, seed=1
            )
            out = {
                "accuracy": right,
                # The binomial standard error of a share of len(eval_set) problems.
                "accuracy_se": math.sqrt(right * (1 - right) / len(eval_set)),
                # Temperature 1, as on-policy training samples: the warm starts are matched on it.
                "sampled_accuracy": sampled,
                "sampled_accuracy_se": math.sqrt(sampled * (1 - sampled) / len(eval_set)),
                "bits_per_byte": bits,
                "bits_per_byte_se": bits_se,
            }
            if validate:  # the validation accuracy chooses the learning rate
                out["val_accuracy"] = accuracy(model, tokenizer, validation, cfg.max_new_tokens)
                out["val_sampled_accuracy"] = accuracy(
                    model, tokenizer, validation, cfg.max_new_tokens, temperature=1.0, seed=2
                )
            return out

        runs: dict[str, dict[int, list[dict[str, float]]]] = {arm: {} for arm in cfg.arms}
        starts = {
            (kind, seed): _start_point(
                warm[kind, seed], url, cfg, kl_prompts, task_metrics, seed,
                out_dir / "warm-start" / f"{kind}-seed{seed}.json", eval_set,
            )
            for seed in cfg.seeds
            for kind in kinds
        }  # fmt: skip
        chosen: dict[str, float] = {}
        rates = (cfg.learning_rate,) if cfg.learning_rate is not None else cfg.learning_rates
        total = sum(
            0 if ARMS[a].loss is None else len(rates) + len(cfg.seeds) - 1 for a in cfg.arms
        )
        done = 0
        for arm in cfg.arms:
            kind = ARMS[arm].student
            if ARMS[arm].loss is None:
                runs[arm] = {seed: [starts[kind, seed]] for seed in cfg.seeds}
                continue
            first = cfg.seeds[0]

            def train(
                seed: int, rate: float, trial: bool, arm: str = arm, kind: str = kind
            ) -> list[Any]:
                nonlocal done
                done += 1
                log(f"[{done}/{total}] {arm}, seed {seed}, learning rate {rate:g}")
                return _train_arm(
                    cfg, arm, seed, warm[kind, seed], url, prompts_path, task_metrics, rate,
                    validate_last=trial,
                )  # fmt: skip

            # The learning rate is chosen on the validation problems of the first seed's runs
            # (their last points); the held-out numbers of those runs play no part in the choice.
            trials = {rate: train(first, rate, len(rates) > 1) for rate in rates}
            best = max(rates, key=lambda r: (validation_score(cfg, trials[r][-1]), -r))
            chosen[arm] = best
            runs[arm][first] = [starts[kind, first], *trials[best]]
            for seed in cfg.seeds[1:]:
                runs[arm][seed] = [starts[kind, seed], *train(seed, best, False)]

    summary = summarise(cfg, runs, teacher, teacher_dir, chosen)
    results_json = out_dir / "results.json"
    results_json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    table_path = out_dir / "results.md"
    table_path.write_text(results_table(summary))
    plot_path = out_dir / "results.png"
    plot_results(summary, runs, plot_path)
    return ExperimentResult(summary, results_json, table_path, plot_path)


def validation_score(cfg: ExperimentConfig, point: dict[str, float]) -> float:
    """The task's selection measure (``SELECTION_MEASURES``) on the validation split, higher is
    better: what a learning rate is chosen by; ``-inf`` when the point has none."""
    key, sign = SELECTION_MEASURES[cfg.task]
    value = point.get(f"val_{key}")
    return float("-inf") if value is None else sign * float(value)


def _text_teacher_quality(teacher_dir: Path, passages: list[Any]) -> dict[str, Any]:
    """The text teacher's own bits per byte and next-token accuracy on the held-out passages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    return dict(textcont.text_quality(model, tokenizer, passages))


def _teacher_quality(url: str, cfg: ExperimentConfig, problems: list[Any]) -> dict[str, Any]:
    """The teacher's greedy accuracy on ``problems``, its texts (the bits-per-byte reference),
    its accuracy sampled at temperature 1 (the distribution on-policy distillation teaches: a
    teacher right greedily but diffuse at temperature 1 teaches a student its near-misses), and
    its accuracy when a wrong digit is planted in its steps first: whether it finds the way back
    from a student's mistake, which on-policy distillation relies on."""
    import random

    from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
    from tokenbridge.research.task import corrupt

    rng = random.Random(0)
    prefixes = [corrupt(p, rng)[0] for p in problems]
    with SyncTeacherClient(TeacherClientConfig(urls=(url,), top_k=cfg.top_k)) as client:
        clean = client.generate(
            [p.prompt for p in problems], max_tokens=cfg.max_new_tokens, temperature=0.0
        )
        sampled = client.generate(
            [p.prompt for p in problems], max_tokens=cfg.max_new_tokens, temperature=1.0, seed=1
        )
        after_error = client.generate(
            [p.prompt + prefix for p, prefix in zip(problems, prefixes, strict=True)],
            max_tokens=cfg.max_new_tokens, temperature=0.0,
        )  # fmt: skip
    texts = [c.text for c in clean.completions]

    def right(completions: list[str]) -> float:
        hits = [parse_answer(t) == p.answer for t, p in zip(completions, problems, strict=True)]
        return sum(hits) / len(problems)

    return {
        "accuracy": right(texts),
        "sampled_accuracy": right([c.text for c in sampled.completions]),
        "accuracy_after_error": right(
            [x + c.text for x, c in zip(prefixes, after_error.completions, strict=True)]
        ),
        "texts": texts,
    }


def _start_point(
    model_dir: Path,
    url: str,
    cfg: ExperimentConfig,
    kl_prompts: list[str],
    task_metrics: Callable[[Any, Any], dict[str, float]],
    seed: int,
    path: Path,
    eval_set: list[Any],
) -> dict[str, float]:
    """The warm start's metrics (teacher compute 0), cached beside the runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
    from tokenbridge.client.train import evaluate_reverse_kl

    settings = _run_settings(cfg, "warm-start", seed)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return dict(saved["point"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with SyncTeacherClient(
        TeacherClientConfig(urls=(url,), top_k=cfg.top_k), student_tokenizer=tokenizer
    ) as client:
        kl = evaluate_reverse_kl(model, tokenizer, client, kl_prompts, cfg.max_new_tokens, seed)
    taken, stop_score = warm_start_reached(model_dir)
    point = {
        "step": 0,
        "teacher_tokens_total": 0,
        "teacher_flops_total": 0,
        "teacher_engine_s_total": 0.0,
        **(
            {"warm_start_steps": taken, "warm_start_val_sampled_accuracy": stop_score}
            if taken
            else {}
        ),
        **task_metrics(model, tokenizer),
        "eval_reverse_kl_per_byte": kl["eval_reverse_kl_per_byte"],
        "eval_reverse_kl_per_byte_se": kl["eval_reverse_kl_per_byte_se"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "point": point}))
    return point


def _run_settings(
    cfg: ExperimentConfig, arm: str, seed: int, rate: float | None = None
) -> dict[str, Any]:
    """What a finished run depends on: reused only when all of it matches."""
    keep = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for name in ("out_dir", "seeds", "arms", "progress", "learning_rate", "learning_rates"):
        keep.pop(name)
    if rate is not None and cfg.learning_rate is None:
        # A run made when the rate was chosen by another measure lacks this one: not reused.
        keep["selection"] = SELECTION_MEASURES[cfg.task][0]
    return json.loads(json.dumps({"arm": arm, "seed": seed, "rate": rate, **keep}, default=str))


def _train_arm(
    cfg: ExperimentConfig,
    arm: str,
    seed: int,
    student_dir: Path,
    url: str,
    prompts_path: Path,
    task_metrics: Callable[..., dict[str, float]],
    rate: float,
    validate_last: bool = False,
) -> list[dict[str, float]]:
    """Train one arm for one seed at learning rate ``rate`` through the service; its evaluation
    points, each with the training batches' sampled reverse KL per token averaged over the steps
    since the previous point (one batch is too noisy to read), the last one also with the
    validation measures when ``validate_last``."""
    from tokenbridge.client.config import TrainConfig
    from tokenbridge.client.train import METRICS, main

    run_dir = cfg.out_dir / "runs" / f"{arm}-seed{seed}-lr{rate:g}"
    done_path = run_dir / "points.json"
    settings = _run_settings(cfg, arm, seed, rate)
    if done_path.is_file():
        saved = json.loads(done_path.read_text())
        if saved.get("settings") == settings:
            return list(saved["points"])
    loss = ARMS[arm].loss
    assert loss is not None
    schedule = ARMS[arm].schedule(cfg)
    steps, eval_every = schedule["steps"], schedule["eval_every"]
    train_cfg = TrainConfig(
        student=str(student_dir), teacher_urls=(url,), prompts=prompts_path,
        eval_prompts=cfg.kl_eval_prompts, loss=loss, top_k=cfg.top_k, steps=steps,
        batch_size=schedule["batch_size"], max_new_tokens=cfg.max_new_tokens,
        learning_rate=rate, warmup_steps=schedule["warmup_steps"], seed=seed, out_dir=run_dir,
        checkpoint_every=steps, eval_every=eval_every, progress=cfg.progress,
    )  # fmt: skip
    # The trainer evaluates every ``eval_every`` steps and at the last: the last call validates.
    evaluations = steps // eval_every + (steps % eval_every != 0)
    calls = 0

    def metrics(model: Any, tokenizer: Any) -> dict[str, float]:
        nonlocal calls
        calls += 1
        return task_metrics(model, tokenizer, validate=validate_last and calls == evaluations)

    main(train_cfg, extra_eval=metrics)
    points = []
    block: list[float] = []
    for line in (run_dir / METRICS).read_text().splitlines():
        record = json.loads(line)
        for entry in record.get("teachers", {}).values():
            if "reverse_kl_per_token" in entry:
                block.append(float(entry["reverse_kl_per_token"]))
        if HEADLINES[cfg.task][0] in record:  # an evaluation point (extra_eval ran)
            if block:
                record["train_reverse_kl_per_token"] = sum(block) / len(block)
            block = []
            points.append(
                {
                    "step": record["step"],
                    "teacher_tokens_total": record["teacher_tokens_total"],
                    "teacher_flops_total": record["teacher_flops_total"],
                    "teacher_engine_s_total": record.get("teacher_engine_s_total", 0.0),
                    **{k: record[k] for k in POINT_KEYS if k in record},
                }
            )
    done_path.write_text(json.dumps({"settings": settings, "points": points}))
    return points
