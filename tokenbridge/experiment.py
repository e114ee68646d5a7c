"""``tokenbridge experiment``: the founding paper's claim, measured in this software.

A teacher is fitted here on worked addition over one family's real tokenizer (GPT-2 by default);
students of another family (Mistral SentencePiece) and a same-tokenizer reference student are
warm-started alike on a few worked examples. Then every arm trains for the same steps through the
real service (its own process, as a user runs it) and the real client:

====================== =======================================================================
arm                    what the student learns from
====================== =======================================================================
opd_reverse_kl         its own samples; the teacher's telescoped log-probs as a reverse-KL
                       advantage (cross-tokenizer OPD)
opd_topk_kl            its own samples; forward KL to the teacher's top-K mapped onto the
                       student's vocabulary, plus a tail atom
opd_semantic_prior     its own samples; the founding paper's chunk-level target
sft                    the teacher's own samples (``/v1/generate``), plain likelihood
same_tokenizer_opd     reverse-KL OPD for a student on the teacher's tokenizer (the reference)
none                   nothing: the warm start as it is
====================== =======================================================================

Teacher compute is what the service reports for the training calls (never the evaluation ones):
teacher tokens, and FLOPs by one count for prefill (scoring) and decode (generation). Results:
``results.json`` (every curve), ``results.md`` (mean ± std over seeds) and ``results.png``
(metrics against teacher FLOPs). Finished runs are kept and reused when the experiment is run
again with the same settings, so an interrupted experiment loses at most the run in progress.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tokenbridge.task import accuracy, bits_per_byte, parse_answer, split_problems
from tokenbridge.taskmodels import FitSpec, fit_task_model
from tokenbridge.tinymodels import TinyModelSpec

__all__ = [
    "ARMS",
    "PRESETS",
    "Arm",
    "ExperimentConfig",
    "ExperimentResult",
    "build_models",
    "run_experiment",
    "summarise",
]


@dataclass(frozen=True)
class Arm:
    """One method: which student it trains (``cross`` or ``same`` tokenizer) and with which loss
    (``None``: no training)."""

    student: str
    loss: str | None
    label: str


ARMS: dict[str, Arm] = {
    "opd_reverse_kl": Arm("cross", "reverse_kl", "cross-tok. OPD, reverse KL"),
    "opd_topk_kl": Arm("cross", "forward_kl", "cross-tok. OPD, top-K KL"),
    "opd_semantic_prior": Arm("cross", "semantic_prior", "cross-tok. OPD, semantic prior"),
    "sft": Arm("cross", "sft", "SFT on teacher samples"),
    "same_tokenizer_opd": Arm("same", "reverse_kl", "same-tok. OPD (reference)"),
    "none": Arm("cross", None, "no distillation"),
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; ``tokenbridge experiment`` generates its flags from it."""

    out_dir: Path = field(default=Path("runs/experiment"), metadata={"help": "results folder"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "student seeds"})
    arms: tuple[str, ...] = field(default=tuple(ARMS), metadata={"help": " | ".join(ARMS)})
    digits: int = field(default=2, metadata={"help": "digits per operand"})
    held_out: int = field(default=200, metadata={"help": "problems no model ever trains on"})
    eval_problems: int = field(default=100, metadata={"help": "held-out problems per evaluation"})
    kl_eval_prompts: int = field(
        default=16, metadata={"help": "held-out prompts for the reverse KL to the teacher"}
    )
    teacher_tokenizer: str = field(default="gpt2", metadata={"help": "teacher's tokenizer"})
    teacher_architecture: str = field(default="gpt2", metadata={"help": "gpt2 | llama"})
    teacher_hidden: int = field(default=128, metadata={"help": "teacher hidden size"})
    teacher_layers: int = field(default=4, metadata={"help": "teacher layers"})
    teacher_fit_steps: int = field(default=1200, metadata={"help": "teacher training steps"})
    student_tokenizer: str = field(
        default="mistral-v1", metadata={"help": "cross-tokenizer student's tokenizer"}
    )
    student_architecture: str = field(default="llama", metadata={"help": "gpt2 | llama"})
    student_hidden: int = field(default=64, metadata={"help": "student hidden size"})
    student_layers: int = field(default=2, metadata={"help": "student layers"})
    warm_start_steps: int = field(default=600, metadata={"help": "students' warm-start steps"})
    warm_start_examples: int = field(
        default=4000, metadata={"help": "worked examples the warm start sees"}
    )
    steps: int = field(default=60, metadata={"help": "training steps per arm"})
    batch_size: int = field(default=32, metadata={"help": "prompts per step"})
    learning_rate: float = field(default=2e-4, metadata={"help": "students' learning rate"})
    warmup_steps: int = field(
        default=10, metadata={"help": "linear warm-up (a fresh optimiser's first steps are large)"}
    )
    top_k: int = field(default=16, metadata={"help": "teacher distribution width"})
    eval_every: int = field(default=12, metadata={"help": "steps between evaluations"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest completion"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        problems = []
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            problems.append(f"unknown arms {unknown}; known: {list(ARMS)}")
        if not self.arms or not self.seeds:
            problems.append("an experiment needs at least one arm and one seed")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.arms)) != len(self.arms):
            problems.append("seeds and arms must not repeat")
        if self.eval_problems > self.held_out or self.kl_eval_prompts > self.held_out:
            problems.append("eval_problems and kl_eval_prompts must not exceed held_out")
        for name in ("steps", "batch_size", "eval_every", "eval_problems", "max_new_tokens",
                     "teacher_fit_steps", "warm_start_steps", "warm_start_examples",
                     "top_k"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for who in ("teacher", "student"):
            if getattr(self, f"{who}_hidden") % 32:
                problems.append(f"{who}_hidden must be a multiple of 32 (heads of 32)")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "out_dir", Path(self.out_dir))


#: Named sizes: ``full`` (the README's numbers, under an hour here), ``smoke`` (CI: minutes, the
#: pipeline end to end) and ``demo`` (``make demo``: one seed, reverse-KL OPD against none).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "smoke": {
        # The full teacher (cached, shared with the demo); a weaker warm start that any teacher
        # signal improves within a few steps; tiny arms.
        "seeds": (0,),
        "warm_start_steps": 100,
        "steps": 8,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_problems": 24,
        "kl_eval_prompts": 16,
    },
    "demo": {
        "seeds": (0,),
        "arms": ("none", "opd_reverse_kl"),
        "steps": 40,
        "eval_every": 10,
    },
}


@dataclass(frozen=True)
class ExperimentResult:
    """What an experiment wrote: its summary (also in ``results.json``) and its files."""

    summary: dict[str, Any]
    results_json: Path
    table_path: Path
    plot_path: Path


# -- models ----------------------------------------------------------------------------------------


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


def _model_name(spec: TinyModelSpec, fit: FitSpec, role: str) -> str:
    tokenizer = Path(spec.tokenizer).name.replace(".", "")
    return (
        f"task-{role}-{spec.architecture}-{tokenizer}-h{spec.hidden}-l{spec.layers}"
        f"-s{spec.seed}-f{fit.steps}x{fit.batch_size}"
        + (f"-u{fit.unused_steps}" if fit.unused_steps else "")
    )


def build_models(
    cfg: ExperimentConfig,
    cache_dir: Path,
    train_problems: list[Any],
    kinds: list[str],
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[tuple[str, int], Path]]:
    """The fitted teacher and every seed's warm-started students of ``kinds`` (``cross``,
    ``same``), fitted here or read from ``cache_dir/models``."""
    models_dir = cache_dir / "models"
    teacher_spec = _teacher_spec(cfg)
    teacher_fit = FitSpec(steps=cfg.teacher_fit_steps)
    log(f"teacher: {teacher_spec.architecture} over {cfg.teacher_tokenizer}, fitted here")
    teacher_dir = fit_task_model(
        teacher_spec, teacher_fit, train_problems,
        models_dir / _model_name(teacher_spec, teacher_fit, "teacher"), cache_dir,
        progress=cfg.progress, desc="fit teacher",
    )  # fmt: skip
    warm: dict[tuple[str, int], Path] = {}
    for seed in cfg.seeds:
        for kind in kinds:
            spec = _student_spec(cfg, kind, seed)
            fit = FitSpec(
                steps=cfg.warm_start_steps, batch_size=16, learning_rate=3e-3,
                examples=cfg.warm_start_examples, seed=seed, unused_steps=50,
            )  # fmt: skip
            warm[kind, seed] = fit_task_model(
                spec, fit, train_problems, models_dir / _model_name(spec, fit, "student"),
                cache_dir, progress=cfg.progress, desc=f"warm start {kind} s{seed}",
            )  # fmt: skip
    return teacher_dir, warm


# -- the run ---------------------------------------------------------------------------------------


def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Run every arm for every seed (reusing finished runs) and write the results."""

    from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
    from tokenbridge.process import serve_process

    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    train_problems, held_out = split_problems(cfg.digits, cfg.held_out, seed=0)
    eval_set = held_out[: cfg.eval_problems]
    kl_prompts = [p.prompt for p in held_out[: cfg.kl_eval_prompts]]

    kinds = sorted({ARMS[a].student for a in cfg.arms})
    teacher_dir, warm = build_models(cfg, cache_dir, train_problems, kinds, log)

    prompts_path = out_dir / "prompts.jsonl"
    # The trainer holds out its first ``eval_prompts`` lines: the reverse-KL prompts come first.
    lines = kl_prompts + [p.prompt for p in train_problems]
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))

    # The service gets one thread: it is idle most of the time, and while it scores the student
    # keeps sampling, so two busy processes never fight over more threads than cores.
    env = {"OMP_NUM_THREADS": "1", "TOKENBRIDGE_CACHE": str(cache_dir)}
    serve_args = ["--teacher", str(teacher_dir), "--data-dir", str(out_dir / "service"),
                  "--log-level", "warning", "--max-top-k", str(max(cfg.top_k, 16))]  # fmt: skip
    log("starting the teacher service (its own process) ...")
    with serve_process(serve_args, out_dir, env=env) as (url, _, service_log):
        log(f"teacher service ready at {url} (log: {service_log})")
        with SyncTeacherClient(TeacherClientConfig(urls=(url,), top_k=cfg.top_k)) as client:
            reference = client.generate(
                [p.prompt for p in eval_set], max_tokens=cfg.max_new_tokens, temperature=0.0
            )
        teacher_texts = [c.text for c in reference.completions]
        teacher_accuracy = sum(
            parse_answer(t) == p.answer for t, p in zip(teacher_texts, eval_set, strict=True)
        ) / len(eval_set)
        log(f"teacher accuracy on {len(eval_set)} held-out problems: {teacher_accuracy:.1%}")

        def task_metrics(model: Any, tokenizer: Any) -> dict[str, float]:
            return {
                "accuracy": accuracy(model, tokenizer, eval_set, cfg.max_new_tokens),
                "bits_per_byte": bits_per_byte(
                    model, tokenizer, [p.prompt for p in eval_set], teacher_texts
                ),
            }

        runs: dict[str, dict[int, list[dict[str, float]]]] = {arm: {} for arm in cfg.arms}
        total = len(cfg.arms) * len(cfg.seeds)
        done = 0
        for seed in cfg.seeds:
            starts = {
                kind: _start_point(
                    warm[kind, seed], url, cfg, kl_prompts, task_metrics, seed,
                    out_dir / "warm-start" / f"{kind}-seed{seed}.json",
                )
                for kind in kinds
            }  # fmt: skip
            for arm in cfg.arms:
                done += 1
                log(f"[{done}/{total}] {arm}, seed {seed}")
                start = starts[ARMS[arm].student]
                if ARMS[arm].loss is None:
                    runs[arm][seed] = [start]
                    continue
                trained = _train_arm(
                    cfg, arm, seed, warm[ARMS[arm].student, seed], url, prompts_path,
                    task_metrics,
                )  # fmt: skip
                runs[arm][seed] = [start, *trained]

    summary = summarise(cfg, runs, teacher_accuracy, teacher_dir)
    results_json = out_dir / "results.json"
    results_json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    table_path = out_dir / "results.md"
    table_path.write_text(results_table(summary))
    plot_path = out_dir / "results.png"
    plot_results(summary, runs, plot_path)
    return ExperimentResult(summary, results_json, table_path, plot_path)


_POINT_KEYS = ("accuracy", "bits_per_byte", "eval_reverse_kl_per_byte")


def _start_point(
    model_dir: Path,
    url: str,
    cfg: ExperimentConfig,
    kl_prompts: list[str],
    task_metrics: Callable[[Any, Any], dict[str, float]],
    seed: int,
    path: Path,
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
    point = {
        "step": 0,
        "teacher_tokens_total": 0,
        "teacher_flops_total": 0,
        **task_metrics(model, tokenizer),
        "eval_reverse_kl_per_byte": kl["eval_reverse_kl_per_byte"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "point": point}))
    return point


def _run_settings(cfg: ExperimentConfig, arm: str, seed: int) -> dict[str, Any]:
    """What a finished run depends on: reused only when all of it matches."""
    keep = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for name in ("out_dir", "seeds", "arms", "progress"):
        keep.pop(name)
    return json.loads(json.dumps({"arm": arm, "seed": seed, **keep}, default=str))


def _train_arm(
    cfg: ExperimentConfig,
    arm: str,
    seed: int,
    student_dir: Path,
    url: str,
    prompts_path: Path,
    task_metrics: Callable[[Any, Any], dict[str, float]],
) -> list[dict[str, float]]:
    """Train one arm for one seed through the service; its evaluation points."""
    from tokenbridge.client.config import TrainConfig
    from tokenbridge.client.train import METRICS, main

    run_dir = cfg.out_dir / "runs" / f"{arm}-seed{seed}"
    done_path = run_dir / "points.json"
    settings = _run_settings(cfg, arm, seed)
    if done_path.is_file():
        saved = json.loads(done_path.read_text())
        if saved.get("settings") == settings:
            return list(saved["points"])
    loss = ARMS[arm].loss
    assert loss is not None
    train_cfg = TrainConfig(
        student=str(student_dir), teacher_urls=(url,), prompts=prompts_path,
        eval_prompts=cfg.kl_eval_prompts, loss=loss, top_k=cfg.top_k, steps=cfg.steps,
        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, seed=seed, out_dir=run_dir,
        checkpoint_every=cfg.steps, eval_every=cfg.eval_every, progress=cfg.progress,
    )  # fmt: skip
    main(train_cfg, extra_eval=task_metrics)
    points = []
    for line in (run_dir / METRICS).read_text().splitlines():
        record = json.loads(line)
        if "accuracy" in record:
            points.append(
                {
                    "step": record["step"],
                    "teacher_tokens_total": record["teacher_tokens_total"],
                    "teacher_flops_total": record["teacher_flops_total"],
                    **{k: record[k] for k in _POINT_KEYS if k in record},
                }
            )
    done_path.write_text(json.dumps({"settings": settings, "points": points}))
    return points


# -- results ---------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean_curve(
    per_seed: dict[int, list[dict[str, float]]], key: str
) -> list[tuple[float, float, float]]:
    """(mean teacher FLOPs, mean, std) of ``key`` at each evaluation step, over seeds."""
    curves = list(per_seed.values())
    length = min(len(c) for c in curves)
    out = []
    for index in range(length):
        flops = _mean_std([float(c[index]["teacher_flops_total"]) for c in curves])[0]
        mean, std = _mean_std([float(c[index][key]) for c in curves])
        out.append((flops, mean, std))
    return out


def _compute_to_reach(curve: list[tuple[float, float, float]], target: float) -> float | None:
    """Teacher FLOPs at which a mean accuracy curve first reaches ``target`` (linear between
    evaluations), or None if it never does."""
    for (f0, m0, _), (f1, m1, _) in itertools.pairwise(curve):
        if m0 >= target:
            return f0
        if m1 >= target:
            return f0 + (f1 - f0) * (target - m0) / (m1 - m0)
    if curve and curve[-1][1] >= target:
        return curve[-1][0]
    return None


def summarise(
    cfg: ExperimentConfig,
    runs: dict[str, dict[int, list[dict[str, float]]]],
    teacher_accuracy: float,
    teacher_dir: Path,
) -> dict[str, Any]:
    """Per arm: final metrics (mean ± std over seeds) and teacher compute; and the two claims:
    the teacher compute an OPD arm needs to reach SFT's final accuracy, as a share of SFT's, and
    the share of the none → same-tokenizer gap an OPD arm closes."""
    arms: dict[str, Any] = {}
    for arm, per_seed in runs.items():
        finals = [points[-1] for points in per_seed.values()]
        entry: dict[str, Any] = {"label": ARMS[arm].label, "seeds": sorted(per_seed)}
        for key in (*_POINT_KEYS, "teacher_tokens_total", "teacher_flops_total"):
            values = [float(f[key]) for f in finals if key in f]
            if values:
                mean, std = _mean_std(values)
                entry[key] = {"mean": mean, "std": std}
        arms[arm] = entry
    claims: dict[str, Any] = {}
    final = {arm: e["accuracy"]["mean"] for arm, e in arms.items() if "accuracy" in e}
    for arm in (a for a in runs if a.startswith("opd_")):
        claim: dict[str, Any] = {}
        if "sft" in runs:
            target = final["sft"]
            sft_start = _mean_curve(runs["sft"], "accuracy")[0][1]
            reached = _compute_to_reach(_mean_curve(runs[arm], "accuracy"), target)
            sft_flops = arms["sft"]["teacher_flops_total"]["mean"]
            claim["sft_final_accuracy"] = target
            # A ratio only means something when SFT got somewhere: from its own start upwards.
            claim["sft_improved"] = target > sft_start
            claim["flops_to_reach_sft_final"] = reached
            claim["compute_share_of_sft"] = (
                None
                if reached is None or sft_flops <= 0 or target <= sft_start
                else reached / sft_flops
            )
        if "none" in final and "same_tokenizer_opd" in final:
            gap = final["same_tokenizer_opd"] - final["none"]
            claim["gap_share_closed"] = None if gap <= 1e-12 else (final[arm] - final["none"]) / gap
            # The two students start from different warm starts (their tokenizers cut digits
            # differently), so also: this arm's gain over its start as a share of the
            # same-tokenizer arm's gain over its own.
            own = final[arm] - _mean_curve(runs[arm], "accuracy")[0][1]
            reference = (
                final["same_tokenizer_opd"]
                - _mean_curve(runs["same_tokenizer_opd"], "accuracy")[0][1]
            )
            claim["gain_share_of_same_tokenizer"] = None if reference <= 1e-12 else own / reference
        claims[arm] = claim
    return {
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "teacher": {"accuracy": teacher_accuracy, "model": str(teacher_dir)},
        "arms": arms,
        "claims": claims,
    }


def _cell(entry: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    if key not in entry:
        return "–"
    mean, std = entry[key]["mean"] * scale, entry[key]["std"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean ± std over seeds) and the two claims in words."""
    seeds = summary["config"]["seeds"]
    lines = [
        f"Teacher accuracy on held-out problems: {summary['teacher']['accuracy']:.1%}. "
        f"Seeds: {', '.join(map(str, seeds))}.",
        "",
        "| arm | accuracy | bits/byte (teacher text) | reverse KL/byte | teacher tokens "
        "| teacher GFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for entry in summary["arms"].values():
        lines.append(
            f"| {entry['label']} | {_cell(entry, 'accuracy')} | {_cell(entry, 'bits_per_byte')} "
            f"| {_cell(entry, 'eval_reverse_kl_per_byte')} "
            f"| {_cell(entry, 'teacher_tokens_total', digits=0)} "
            f"| {_cell(entry, 'teacher_flops_total', 1e-9, 2)} |"
        )
    lines.append("")
    for arm, claim in summary["claims"].items():
        label = summary["arms"][arm]["label"]
        if "compute_share_of_sft" in claim:
            share, target = claim["compute_share_of_sft"], claim["sft_final_accuracy"]
            if not claim["sft_improved"]:
                lines.append(
                    f"- {label}: no compute ratio: SFT ended at {target:.3f}, not above where "
                    "it started."
                )
            elif share is None:
                lines.append(
                    f"- {label}: does not reach SFT's final accuracy ({target:.3f}) within "
                    "its budget."
                )
            else:
                lines.append(
                    f"- {label}: reaches SFT's final accuracy ({target:.3f}) with {share:.2f}× "
                    "SFT's teacher FLOPs."
                )
        if "gap_share_closed" in claim:
            share = claim["gap_share_closed"]
            lines.append(
                f"- {label}: closes {share:.0%} of the gap from no distillation to "
                "same-tokenizer OPD."
                if share is not None
                else f"- {label}: no gap to close: same-tokenizer OPD ended no higher than no "
                "distillation."
            )
            gain = claim.get("gain_share_of_same_tokenizer")
            if gain is not None:
                lines.append(
                    f"- {label}: gains {gain:.0%} of what same-tokenizer OPD gains over its own "
                    "warm start."
                )
    return "\n".join(lines) + "\n"


def plot_results(
    summary: dict[str, Any], runs: dict[str, dict[int, list[dict[str, float]]]], path: Path
) -> Path:
    """Accuracy and bits per byte against teacher FLOPs, mean ± std over seeds, one line per
    arm (no distillation as a level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, title in (
        (axes[0], "accuracy", "held-out accuracy (higher is better)"),
        (axes[1], "bits_per_byte", "bits/byte of teacher text (lower is better)"),
    ):
        for arm, per_seed in runs.items():
            label = summary["arms"][arm]["label"]
            curve = _mean_curve(per_seed, key)
            if ARMS[arm].loss is None:
                axis.axhline(curve[0][1], color="grey", linestyle=":", label=label)
                continue
            xs = [c[0] / 1e9 for c in curve]
            means = [c[1] for c in curve]
            stds = [c[2] for c in curve]
            style = "--" if ARMS[arm].student == "same" else "-"
            (line,) = axis.plot(xs, means, style, marker="o", markersize=3, label=label)
            axis.fill_between(
                xs, [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=line.get_color(), alpha=0.15,
            )  # fmt: skip
        axis.set_xlabel("teacher compute used for training (GFLOPs)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(summary["config"]["seeds"])
    figure.suptitle(f"cross-tokenizer distillation, mean ± std over {seeds} seed(s)", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def preset_config(name: str, **overrides: Any) -> ExperimentConfig:
    """The named preset with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    return replace(ExperimentConfig(), **{**PRESETS[name], **overrides})


def before_after_table(summary: dict[str, Any]) -> str:
    """The demo's table: the warm start (no distillation) against each trained arm's end."""
    rows = [
        ("task accuracy (held out)", "accuracy", 1.0, 3),
        ("bits/byte of teacher text", "bits_per_byte", 1.0, 3),
        ("reverse KL to teacher / byte", "eval_reverse_kl_per_byte", 1.0, 3),
        ("teacher tokens used", "teacher_tokens_total", 1.0, 0),
        ("teacher GFLOPs used", "teacher_flops_total", 1e-9, 2),
    ]
    arms = summary["arms"]
    before = arms.get("none")
    trained = [a for a in arms if ARMS[a].loss is not None]
    header = ["", "before (warm start)"] + [f"after: {arms[a]['label']}" for a in trained]
    lines = [
        f"teacher accuracy (held out): {summary['teacher']['accuracy']:.3f}",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for title, key, scale, digits in rows:
        cells = [title]
        for entry in [before, *(arms[a] for a in trained)]:
            if entry is None or key not in entry:
                cells.append("–" if entry is None or "teacher" not in key else "0")
                continue
            cells.append(f"{entry[key]['mean'] * scale:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
