"""Does a distillation step help? Train the experiment's warm-started students for a few steps of
each loss at several learning rates, from the same start, through the real service and trainer,
and measure the change of the *exact* per-position reverse KL
(``tokenbridge/research/exactkl.py``) on fixed student completions of validation problems (never
the held-out test problems).

Two pairs: ``same`` (a student on the teacher's GPT-2 tokenizer) and ``cross`` (a Mistral
SentencePiece student). One JSON line per run; the last line is a summary (the best learning rate
of each loss and pair by the mean change). Usage::

    python bench/learning.py --losses candidate_reverse_kl reverse_kl --learning-rates 1e-4 1e-3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenbridge.hub import DEFAULT_CACHE_DIR

VALIDATION = 200  # the last train problems, left out of the trainer's prompts


def main() -> None:
    """Parse the flags, run every (pair, loss, learning rate, seed), print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["same", "cross"])
    parser.add_argument(
        "--losses", nargs="+", default=["candidate_reverse_kl", "reverse_kl", "sparse_reverse_kl"]
    )
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--baseline", default="auto")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--validation-prompts", type=int, default=32)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="other TrainConfig fields (JSON values), e.g. candidates=32",
    )  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()

    from tokenbridge.research.exactkl import StepCheck
    from tokenbridge.research.experiment import ExperimentConfig

    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        check = StepCheck.start(
            ExperimentConfig(progress=False), args.cache_dir, Path(folder), args.pairs
        )
        try:
            for pair in args.pairs:
                validation = check.validation_completions(pair, args.validation_prompts)
                before = check.exact(pair, None, validation)
                for loss in args.losses:
                    for rate in args.learning_rates:
                        for seed in args.seeds:
                            started = time.perf_counter()
                            model = check.train(
                                pair, loss=loss, learning_rate=rate, steps=args.steps,
                                batch_size=args.batch_size, seed=seed,
                                samples_per_prompt=args.samples_per_prompt,
                                baseline=args.baseline, warmup_steps=args.warmup_steps,
                                **extra,
                            )  # fmt: skip
                            after = check.exact(pair, model, validation)
                            record = {
                                "pair": pair, "loss": loss, "learning_rate": rate, "seed": seed,
                                "steps": args.steps, **extra, "before": before, "after": after,
                                "change": after - before, "seconds": time.perf_counter() - started,
                            }  # fmt: skip
                            results.append(record)
                            print(json.dumps(record), flush=True)
        finally:
            check.close()
    best: dict[str, dict[str, Any]] = {}
    for record in results:
        key = f"{record['pair']}/{record['loss']}"
        runs = [r for r in results if f"{r['pair']}/{r['loss']}" == key]
        by_rate: dict[float, list[float]] = {}
        for run in runs:
            by_rate.setdefault(run["learning_rate"], []).append(run["change"])
        rate, changes = min(by_rate.items(), key=lambda item: sum(item[1]) / len(item[1]))
        best[key] = {"learning_rate": rate, "mean_change": sum(changes) / len(changes)}
    print(json.dumps({"summary": best, "steps": args.steps, "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
