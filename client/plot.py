"""Draw a run's curves (``metrics.jsonl``) to a PNG: loss, evaluation, teacher wait, throughput."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_metrics"]

#: (title, metric keys) of each panel; a panel whose metrics never appear is left out.
PANELS = (
    ("loss", ("loss",)),
    (
        "held-out reverse KL to the teacher",
        ("eval_reverse_kl_per_token", "eval_reverse_kl_per_byte"),
    ),
    ("teacher wait share of step time", ("teacher_wait_fraction",)),
    ("student tokens per second", ("tokens_per_s",)),
)


def plot_metrics(metrics_paths: list[Path], out: Path) -> Path:
    """Plot one or more runs' ``metrics.jsonl`` against the step into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    runs = {}
    for path in metrics_paths:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not records:
            raise ValueError(f"{path} holds no metrics")
        runs[Path(path).parent.name or str(path)] = records
    panels = [
        (title, keys)
        for title, keys in PANELS
        if any(key in r for records in runs.values() for r in records for key in keys)
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for axis, (title, keys) in zip(axes[:, 0], panels, strict=True):
        for name, records in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(
                        steps,
                        values,
                        marker="." if len(points) < 30 else None,
                        label=f"{name}: {key}" if len(runs) > 1 or len(keys) > 1 else key,
                    )
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
