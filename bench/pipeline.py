"""Benchmark of the trainer's pipeline: how long the student waits on the teacher, with the
pipeline off (score, then train) and on (the next rollouts are scored while this step trains).

Setup: a ``tokenbridge serve`` process on loopback with a tiny GPT-2-architecture teacher (hidden
256, 4 layers); a tiny Llama-architecture student on Mistral's SentencePiece tokenizer; the
sampled-token reverse-KL loss; the same seed, prompts and step count for both runs. The first step
of each run (start-up) is left out of the means.

Run ``python bench/pipeline.py``; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.train import main as train_main
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# The tests' helper that starts `tokenbridge serve` and waits until it is ready.
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from service_support import serve_process  # noqa: E402

TARGETS = {"teacher_wait_fraction_pipelined_max": 0.10}


def _run(config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    summary = train_main(config)
    elapsed = time.perf_counter() - started
    records = [json.loads(x) for x in summary.metrics_path.read_text().splitlines() if x.strip()]
    steady = records[1:] or records
    step_s = sum(r["step_s"] for r in steady)
    wait_s = sum(r["teacher_wait_s"] for r in steady)
    return {
        "pipeline_depth": config.pipeline_depth,
        "steps": summary.steps,
        "teacher_wait_fraction": wait_s / step_s if step_s else 0.0,
        "steps_per_s": len(steady) / step_s if step_s else 0.0,
        "median_step_s": statistics.median(r["step_s"] for r in steady),
        "student_tokens_per_s": sum(r["student_tokens"] for r in steady) / step_s
        if step_s
        else 0.0,
        "wall_s": elapsed,
    }


def main() -> int:
    """Start a local service, train with the pipeline off and on, print the JSON result last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TOKENBRIDGE_CACHE", REPO_ROOT / ".cache")),
    )
    args = parser.parse_args()
    cache = args.cache_dir
    teacher = build_tiny_model(
        TinyModelSpec("gpt2", "gpt2", hidden=256, layers=4, heads=4),
        cache / "models" / "bench-gpt2-h256-l4",
        cache,
    )
    student = build_tiny_model(
        TinyModelSpec("mistral-v1", "llama", hidden=128, layers=2, heads=4),
        cache / "models" / "bench-llama-mistral-h128-l2",
        cache,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    # The teacher and the student share this machine's cores: give each its own share, as two
    # machines (or GPUs) would have, instead of letting both oversubscribe every core.
    threads = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    serve_args = [
        "--teacher",
        str(teacher),
        "--data-dir",
        str(work / "data"),
        "--log-level",
        "warning",
    ]
    env = {"TOKENBRIDGE_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    runs = []
    with serve_process(serve_args, work, env=env, timeout=300) as (url, _, _):
        for depth in (0, 1):
            config = TrainConfig(
                student=str(student),
                teacher_urls=(url,),
                loss="reverse_kl",
                top_k=20,
                steps=args.steps,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                eval_prompts=0,
                pipeline_depth=depth,
                out_dir=work / f"depth-{depth}",
                checkpoint_every=args.steps,
                progress=False,
                seed=0,
            )
            runs.append(_run(config))
            print(json.dumps(runs[-1]), file=sys.stderr)
    off, on = runs
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "teacher": {"hidden": 256, "layers": 4, "tokenizer": "gpt2"},
                "student": {"hidden": 128, "layers": 2, "tokenizer": "mistral-v1"},
                "threads_each": threads,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "pipeline_off": off,
                "pipeline_on": on,
                "teacher_wait_fraction": {
                    "off": off["teacher_wait_fraction"],
                    "on": on["teacher_wait_fraction"],
                },
                "steps_per_s": {"off": off["steps_per_s"], "on": on["steps_per_s"]},
                "speedup": on["steps_per_s"] / off["steps_per_s"] if off["steps_per_s"] else None,
                "targets": TARGETS,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
