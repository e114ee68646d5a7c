"""The experiment's results: curves averaged over seeds, teacher compute to reach a target,
paired differences with confidence intervals, the Markdown tables (the experiment's and the
demo's) and the plot. Pure arithmetic on the runs' points: no models, no service."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenbridge.research.experiment.config import ARMS, HEADLINES, ExperimentConfig

#: The measures an evaluation point carries, kept from the trainer's records and averaged here.
POINT_KEYS = (
    "accuracy",
    "accuracy_se",
    "next_token_accuracy",
    "next_token_accuracy_se",
    "val_bits_per_byte",
    "bits_per_byte",
    "bits_per_byte_se",
    "eval_reverse_kl_per_byte",
    "eval_reverse_kl_per_byte_se",
    "val_accuracy",
    "val_sampled_accuracy",
    "sampled_accuracy",
    "sampled_accuracy_se",
    "train_reverse_kl_per_token",
)


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
        if not all(key in c[index] for c in curves):
            continue  # a measure some points lack (the warm start has no training batch)
        flops = _mean_std([float(c[index]["teacher_flops_total"]) for c in curves])[0]
        mean, std = _mean_std([float(c[index][key]) for c in curves])
        out.append((flops, mean, std))
    return out


def _compute_to_reach(curve: list[tuple[float, float, float]], target: float) -> float | None:
    """Teacher FLOPs at which a mean curve (higher is better) first reaches ``target`` (linear
    between evaluations), or None if it never does."""
    for (f0, m0, _), (f1, m1, _) in itertools.pairwise(curve):
        if m0 >= target:
            return f0
        if m1 >= target:
            return f0 + (f1 - f0) * (target - m0) / (m1 - m0)
    if curve and curve[-1][1] >= target:
        return curve[-1][0]
    return None


def _paired_difference(
    runs: dict[str, dict[int, list[dict[str, float]]]], arm: str, other: str, key: str
) -> dict[str, float] | None:
    """Final ``key`` of ``arm`` minus ``other``'s, paired by seed: mean, std and a 95% confidence
    interval (Student's t over the seeds); None with fewer than two shared seeds."""
    seeds = sorted(set(runs[arm]) & set(runs[other]))
    return _interval(
        [
            float(runs[arm][s][-1][key]) - float(runs[other][s][-1][key])
            for s in seeds
            if key in runs[arm][s][-1] and key in runs[other][s][-1]
        ]
    )


def _gain_from_start(per_seed: dict[int, list[dict[str, float]]], key: str) -> dict | None:
    """Final ``key`` minus the run's own start (its warm start), paired by seed: mean, std and a
    95% confidence interval; None with fewer than two seeds."""
    return _interval(
        [
            float(points[-1][key]) - float(points[0][key])
            for points in per_seed.values()
            if len(points) > 1 and key in points[-1] and key in points[0]
        ]
    )


def _interval(values: list[float]) -> dict[str, float] | None:
    """Mean, std and a 95% confidence interval (Student's t) of per-seed ``values``; None with
    fewer than two."""
    if len(values) < 2:
        return None
    mean, std = _mean_std(values)
    # Two-sided 97.5% quantiles of Student's t for 1..9 degrees of freedom (then about 2).
    quantile = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)
    half = (quantile[len(values) - 2] if len(values) <= 10 else 2.0) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "seeds": len(values)}


#: How the claims name each headline measure.
MEASURE_WORDS = {
    "accuracy": "accuracy",
    "sampled_accuracy": "accuracy at temperature 1",
    "bits_per_byte": "bits/byte",
}

#: The measures whose paired differences (between arms, and from each run's start) are reported.
DIFFERENCE_KEYS = (
    "accuracy", "sampled_accuracy", "next_token_accuracy", "eval_reverse_kl_per_byte",
    "bits_per_byte",
)  # fmt: skip


def summarise(
    cfg: ExperimentConfig,
    runs: dict[str, dict[int, list[dict[str, float]]]],
    teacher: dict[str, Any],
    teacher_dir: Path,
    learning_rates: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per arm: final metrics (mean ± std over seeds), teacher compute (FLOPs and the engine's
    measured seconds), the learning rate chosen on validation, paired differences against no
    distillation and SFT (95% confidence intervals over seeds); and the two claims, stated in
    teacher FLOPs on the task's headline measure (``HEADLINES``: accuracy; bits per byte of real
    text): the teacher compute an OPD arm needs to reach SFT's final quality, as a share of
    SFT's, and the share of the none → same-tokenizer gap an OPD arm closes."""
    headline, sign = HEADLINES[cfg.task]

    def curve(per_seed: dict[int, list[dict[str, float]]]) -> list[tuple[float, float, float]]:
        """The headline's mean curve, turned so that higher is better."""
        return [(f, sign * m, s) for f, m, s in _mean_curve(per_seed, headline)]

    arms: dict[str, Any] = {}
    for arm, per_seed in runs.items():
        finals = [points[-1] for points in per_seed.values()]
        entry: dict[str, Any] = {"label": ARMS[arm].label, "seeds": sorted(per_seed)}
        if learning_rates and arm in learning_rates:
            entry["learning_rate"] = learning_rates[arm]
        for other in ("none", "sft"):
            if other in runs and other != arm:
                for key in DIFFERENCE_KEYS:
                    difference = _paired_difference(runs, arm, other, key)
                    if difference is not None:
                        entry.setdefault("minus", {}).setdefault(other, {})[key] = difference
        if ARMS[arm].loss is not None:
            for key in DIFFERENCE_KEYS:
                gain = _gain_from_start(per_seed, key)
                if gain is not None:
                    entry.setdefault("minus", {}).setdefault("start", {})[key] = gain
        starts = [points[0] for points in per_seed.values()]
        if any("warm_start_steps" in p for p in starts):
            entry["warm_starts"] = {
                str(seed): {k: points[0][k] for k in ("warm_start_steps",
                            "warm_start_val_sampled_accuracy", "accuracy", "sampled_accuracy")
                            if k in points[0]}
                for seed, points in per_seed.items()
            }  # fmt: skip
        for key in (*POINT_KEYS, "teacher_tokens_total", "teacher_flops_total",
                    "teacher_engine_s_total"):  # fmt: skip
            values = [float(f[key]) for f in finals if key in f]
            if values:
                mean, std = _mean_std(values)
                entry[key] = {"mean": mean, "std": std}
        arms[arm] = entry
    claims: dict[str, Any] = {}
    final = {arm: sign * e[headline]["mean"] for arm, e in arms.items() if headline in e}
    for arm in (a for a in runs if a.startswith("opd_")):
        claim: dict[str, Any] = {"measure": headline}
        if "sft" in runs:
            target = final["sft"]
            sft_start = curve(runs["sft"])[0][1]
            reached = _compute_to_reach(curve(runs[arm]), target)
            sft_flops = arms["sft"]["teacher_flops_total"]["mean"]
            claim["sft_final"] = sign * target
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
            own = final[arm] - curve(runs[arm])[0][1]
            reference = final["same_tokenizer_opd"] - curve(runs["same_tokenizer_opd"])[0][1]
            claim["gain_share_of_same_tokenizer"] = None if reference <= 1e-12 else own / reference
        claims[arm] = claim
    return {
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "teacher": {**teacher, "model": str(teacher_dir)},
        "compute_measure": "teacher FLOPs (usage.teacher_flops); engine seconds beside them",
        "arms": arms,
        "claims": claims,
    }


def _cell(entry: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    if key not in entry:
        return "–"
    mean, std = entry[key]["mean"] * scale, entry[key]["std"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _teacher_line(teacher: dict[str, Any]) -> str:
    """The teacher's own quality in words: accuracy (and after a planted mistake), or, on
    text, its bits per byte and next-token accuracy."""
    if "accuracy" not in teacher:
        return (
            f"Teacher on held-out text: {teacher['bits_per_byte']:.3f} bits/byte, next-token "
            f"accuracy {teacher['next_token_accuracy']:.1%}"
        )
    after_error = teacher.get("accuracy_after_error")
    sampled = teacher.get("sampled_accuracy")
    return (
        f"Teacher accuracy on held-out problems: {teacher['accuracy']:.1%}"
        + (f" ({sampled:.1%} sampled at temperature 1)" if sampled is not None else "")
        + (f"; after a wrong digit planted in its steps: {after_error:.1%}" if after_error else "")
    )


def results_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean ± std over seeds) and the two claims in words."""
    seeds = summary["config"]["seeds"]
    text = summary["config"].get("task") == "text"
    accuracy_key = "next_token_accuracy" if text else "accuracy"
    lines = [
        _teacher_line(summary["teacher"]) + f". Seeds: {', '.join(map(str, seeds))}.",
        "",
        f"| arm | lr | {'next-token accuracy' if text else 'accuracy (greedy)'} "
        + ("" if text else "| accuracy (temperature 1) ")
        + f"| bits/byte ({'real text' if text else 'teacher text'}) | reverse KL/byte "
        "| teacher tokens | teacher GFLOPs | teacher engine s |",
        "|---|---|---|" + ("" if text else "---|") + "---|---|---|---|---|",
    ]
    for entry in summary["arms"].values():
        rate = f"{entry['learning_rate']:g}" if "learning_rate" in entry else "–"
        sampled = "" if text else f"| {_cell(entry, 'sampled_accuracy')} "
        lines.append(
            f"| {entry['label']} | {rate} | {_cell(entry, accuracy_key)} {sampled}"
            f"| {_cell(entry, 'bits_per_byte')} | {_cell(entry, 'eval_reverse_kl_per_byte')} "
            f"| {_cell(entry, 'teacher_tokens_total', digits=0)} "
            f"| {_cell(entry, 'teacher_flops_total', 1e-9, 2)} "
            f"| {_cell(entry, 'teacher_engine_s_total', digits=1)} |"
        )
    lines.append("")
    differences = [
        (entry["label"], other, key, value)
        for entry in summary["arms"].values()
        for other, by_key in entry.get("minus", {}).items()
        for key, value in by_key.items()
    ]
    if differences:
        lines += [
            "Paired differences over seeds (arm minus reference, or minus the run's own start; "
            "95% confidence interval):",
            "",
            "| arm | minus | measure | mean | 95% CI |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {other} | {key} | {value['mean']:+.3f} "
            f"| [{value['low']:+.3f}, {value['high']:+.3f}] |"
            for label, other, key, value in differences
        ]
        lines.append("")
    # One arm per student holds its warm starts (every arm of a student shares them).
    first_arm = {ARMS[name].student: name for name in reversed(summary["arms"])}
    starts = [
        (kind, seed, start)
        for kind, name in sorted(first_arm.items())
        for seed, start in summary["arms"][name].get("warm_starts", {}).items()
    ]
    if starts:
        lines += [
            "Warm starts (each fitted until its validation accuracy at temperature 1 reached "
            "the target):",
            "",
            "| student | seed | steps | validation, T=1 | held-out greedy | held-out T=1 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {'same tokenizer' if kind == 'same' else 'cross-tokenizer'} | {seed} "
            f"| {start.get('warm_start_steps', '–')} "
            f"| {start.get('warm_start_val_sampled_accuracy', math.nan):.3f} "
            f"| {start.get('accuracy', math.nan):.3f} "
            f"| {start.get('sampled_accuracy', math.nan):.3f} |"
            for kind, seed, start in starts
        ]
        lines.append("")
    for arm, claim in summary["claims"].items():
        label = summary["arms"][arm]["label"]
        measure = MEASURE_WORDS.get(claim.get("measure", "accuracy"), "accuracy")
        if "compute_share_of_sft" in claim:
            share, target = claim["compute_share_of_sft"], claim["sft_final"]
            if not claim["sft_improved"]:
                lines.append(
                    f"- {label}: no compute ratio: SFT ended at {target:.3f}, not above where "
                    "it started."
                )
            elif share is None:
                lines.append(
                    f"- {label}: does not reach SFT's final {measure} ({target:.3f}) within "
                    "its budget."
                )
            else:
                lines.append(
                    f"- {label}: reaches SFT's final {measure} ({target:.3f}) with {share:.2f}× "
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
    """Accuracy, bits per byte and the training batches' reverse KL (block means) against
    teacher FLOPs, mean ± std over seeds, one line per arm (no distillation as a level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    text = summary["config"].get("task") == "text"
    for axis, key, title in (
        (axes[0], "next_token_accuracy", "held-out next-token accuracy (higher is better)")
        if text
        else (axes[0], "accuracy", "held-out accuracy (higher is better)"),
        (axes[1], "bits_per_byte",
         f"bits/byte of {'real held-out' if text else 'teacher'} text (lower is better)"),
        (axes[2], "train_reverse_kl_per_token",
         "training batches' reverse KL / token, block means"),
    ):  # fmt: skip
        for arm, per_seed in runs.items():
            label = summary["arms"][arm]["label"]
            curve = _mean_curve(per_seed, key)
            if not curve:
                continue
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


def before_after_table(summary: dict[str, Any]) -> str:
    """The demo's table: the warm start (no distillation) against each trained arm's end, each
    headline measure with its evaluation noise (one standard error), and ``*`` where the change
    from before exceeds twice the combined standard error in the right direction."""
    text = summary["config"].get("task") == "text"
    rows = [
        ("next-token accuracy (held-out text)", "next_token_accuracy", 1.0, 3, +1),
        ("bits/byte of real held-out text", "bits_per_byte", 1.0, 3, -1),
    ] if text else [
        ("task accuracy (held out)", "accuracy", 1.0, 3, +1),
        ("task accuracy, sampled at temperature 1", "sampled_accuracy", 1.0, 3, +1),
        ("bits/byte of teacher text", "bits_per_byte", 1.0, 3, -1),
    ]  # fmt: skip
    rows += [
        ("reverse KL to teacher / byte", "eval_reverse_kl_per_byte", 1.0, 3, -1),
        ("teacher tokens used", "teacher_tokens_total", 1.0, 0, 0),
        ("teacher GFLOPs used", "teacher_flops_total", 1e-9, 2, 0),
        ("teacher engine seconds", "teacher_engine_s_total", 1.0, 1, 0),
    ]
    arms = summary["arms"]
    before = arms.get("none")
    trained = [a for a in arms if ARMS[a].loss is not None]
    header = ["", "before (warm start)"] + [f"after: {arms[a]['label']}" for a in trained]
    teacher = summary["teacher"]
    lines = [
        _teacher_line(teacher)
        if text
        else f"teacher accuracy (held out): {teacher['accuracy']:.3f}",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def value(entry: dict[str, Any] | None, key: str) -> float | None:
        return None if entry is None or key not in entry else float(entry[key]["mean"])

    for title, key, scale, digits, better in rows:
        cells = [title]
        for entry in [before, *(arms[a] for a in trained)]:
            mean = value(entry, key)
            if mean is None:
                cells.append("–" if entry is None or "teacher" not in key else "0")
                continue
            cell = f"{mean * scale:.{digits}f}"
            error = value(entry, f"{key}_se")
            if error is not None and math.isfinite(error):
                cell += f" ± {error * scale:.{digits}f}"
            start, start_error = value(before, key), value(before, f"{key}_se")
            if better and entry is not before and start is not None and error is not None:
                noise = math.sqrt(error**2 + (start_error or 0.0) ** 2)
                if better * (mean - start) > 2 * noise:
                    cell += " **"
                elif better * (mean - start) > noise:
                    cell += " *"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "± one standard error of the evaluation (accuracy: binomial over the held-out problems; "
        "bits/byte: over the teacher's texts; reverse KL/byte: over the student's samples). "
        "* / ** the change from before exceeds once / twice the combined standard error, for the "
        "better."
    )
    return "\n".join(lines)
