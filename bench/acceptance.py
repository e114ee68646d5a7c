"""Acceptance run of the defaults on a task and models the defaults were not chosen on.

``tokenbridge train`` with no loss or learning-rate flags, against the same student trained with
``--loss sft`` and with ``--rest-divergence`` (the default loss charging the divergence inside
its rest, docs/mapping.md §4b) for the same steps (100 steps of 16 prompts), on continuing
Shakespeare (``tokenbridge.research.textcont``: plays held out whole). The pair is the experiment's
turned around and rebuilt: the teacher is a Llama-architecture model over the Mistral
SentencePiece vocabulary, the student a GPT-2-architecture model over GPT-2's byte-level BPE (the
experiment distils GPT-2 into SentencePiece, on arithmetic). Both are fitted here and cached.

Measured per seed, before and after, on the held-out plays: reverse KL to the teacher per byte on
the student's own samples (128 prompts, temperature 1, the trainer's evaluation function), bits
per byte of the real continuations (200 passages) and top-1 next-token accuracy on them. Prints
one JSON object (and writes it, with a Markdown table, to ``--out``).

    python bench/acceptance.py --out runs/acceptance
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tokenbridge.research.taskmodels import FitSpec, fit_model
from tokenbridge.research.textcont import (
    HELD_OUT_PLAYS,
    VALIDATION_PLAYS,
    Passage,
    examples,
    passages,
    text_quality,
)
from tokenbridge.tinymodels import TinyModelSpec

ARMS = {
    "defaults": [],
    "sft": ["--loss", "sft"],
    "rest": ["--rest-divergence"],
    # The defaults before the teacher's own ids joined the support: the student's top-16 alone.
    "student_support": ["--teacher-support", "0", "--candidates", "16"],
}


def _measure(
    model_dir: Path, state: Path | None, url: str, kl_prompts: list[str], held: list[Passage],
    seed: int,
) -> dict[str, float]:  # fmt: skip
    """The student (its trained weights from ``state`` when given) measured three ways."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
    from tokenbridge.client.train import evaluate_reverse_kl

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state is not None:
        model.load_state_dict(torch.load(state, weights_only=False)["model"])
    model.eval()
    with SyncTeacherClient(TeacherClientConfig(urls=(url,)), student_tokenizer=tokenizer) as c:
        kl = evaluate_reverse_kl(model, tokenizer, c, kl_prompts, 32, seed)
    return {
        "eval_reverse_kl_per_byte": kl["eval_reverse_kl_per_byte"],
        "eval_reverse_kl_per_byte_se": kl["eval_reverse_kl_per_byte_se"],
        **text_quality(model, tokenizer, held),
    }


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def main() -> None:
    """Fit (or reuse) the models, run every chosen arm for each seed, print and save results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/acceptance"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--warm-steps", type=int, default=300)
    parser.add_argument("--train-passages", type=int, default=20000)
    args = parser.parse_args()

    from tokenbridge.hub import DEFAULT_CACHE_DIR
    from tokenbridge.process import serve_process

    cache = Path(os.environ.get("TOKENBRIDGE_CACHE") or DEFAULT_CACHE_DIR)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train = passages("train", count=args.train_passages, seed=0)
    held_all = passages("held_out", count=328, seed=1)
    kl_prompts = [p.prompt for p in held_all[:128]]
    held = held_all[128:]
    data = {"task": "shakespeare", "held_out": [*HELD_OUT_PLAYS, *VALIDATION_PLAYS], "seed": 0}

    teacher_spec = TinyModelSpec(
        tokenizer="mistral-v1", architecture="llama", hidden=128, layers=4, heads=4,
        max_positions=256,
    )  # fmt: skip
    teacher_fit = FitSpec(steps=args.teacher_steps, batch_size=32, unused_steps=50)
    teacher_dir = fit_model(
        teacher_spec, teacher_fit, lambda tok: (examples(tok, train), []),
        {**data, "count": len(train)},
        cache / "models" / f"text-teacher-llama-mistralv1-h128-l4-f{args.teacher_steps}", cache,
        desc="fit teacher",
    )  # fmt: skip

    prompts_path = out / "prompts.jsonl"
    # Train prompts only: the held-out ones are measured here, before and after, the same way.
    prompts_path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in train))

    env = {"OMP_NUM_THREADS": "1", "TOKENBRIDGE_CACHE": str(cache)}
    results: dict[str, Any] = {"settings": vars(args) | {"out": str(out)}, "seeds": {}}
    with serve_process(
        ["--teacher", str(teacher_dir), "--data-dir", str(out / "service"),
         "--log-level", "warning"], out, env=env,
    ) as (url, _, _log):  # fmt: skip
        from transformers import AutoModelForCausalLM, AutoTokenizer

        teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
        teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
        results["teacher"] = text_quality(teacher_model, teacher_tok, held)
        print(f"teacher: {results['teacher']}", file=sys.stderr)
        for seed in args.seeds:
            spec = TinyModelSpec(
                tokenizer="gpt2", architecture="gpt2", hidden=64, layers=2, heads=2,
                max_positions=256, seed=seed,
            )  # fmt: skip
            fit = FitSpec(steps=args.warm_steps, batch_size=16, seed=seed, unused_steps=50)
            warm = fit_model(
                spec, fit, lambda tok: (examples(tok, train[:4000]), []),
                {**data, "count": 4000},
                cache / "models" / f"text-student-gpt2-gpt2-h64-l2-s{seed}-f{args.warm_steps}",
                cache, desc=f"warm start s{seed}",
            )  # fmt: skip
            row: dict[str, Any] = {"before": _measure(warm, None, url, kl_prompts, held, seed)}
            print(f"seed {seed} before: {row['before']}", file=sys.stderr)
            for arm in args.arms:
                flags = ARMS[arm]
                run_dir = out / f"{arm}-seed{seed}"
                command = [
                    sys.executable, "-m", "tokenbridge", "train", "--student", str(warm),
                    "--teacher-urls", url, "--prompts", str(prompts_path),
                    "--eval-prompts", "0", "--steps", str(args.steps),
                    "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps),
                    "--seed", str(seed), "--out-dir", str(run_dir), "--no-progress", *flags,
                ]  # fmt: skip
                with (out / f"{arm}-seed{seed}.log").open("w") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=log, env=os.environ)
                row[arm] = _measure(warm, run_dir / "checkpoint.pt", url, kl_prompts, held, seed)
                print(f"seed {seed} {arm}: {row[arm]}", file=sys.stderr)
            results["seeds"][seed] = row

    keys = ("eval_reverse_kl_per_byte", "bits_per_byte", "next_token_accuracy")
    summary: dict[str, Any] = {}
    rows_by_seed = list(results["seeds"].values())
    for arm in ("before", *args.arms):
        summary[arm] = {k: _mean_sd([r[arm][k] for r in rows_by_seed]) for k in keys}
    pairs = [(arm, "before") for arm in args.arms]
    pairs += [(arm, "sft") for arm in args.arms if arm != "sft" and "sft" in args.arms]
    for arm, other in pairs:
        summary[f"{arm}_minus_{other}"] = {
            k: _mean_sd([r[arm][k] - r[other][k] for r in rows_by_seed]) for k in keys
        }
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["| | reverse KL/byte | bits/byte (real text) | next-token accuracy |",
            "|---|---|---|---|"]  # fmt: skip
    for name in summary:
        sign = "+" if "minus" in name else ""
        cells = [
            f"{summary[name][k]['mean']:{sign}.4f} ± {summary[name][k]['sd']:.4f}" for k in keys
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
