"""Gradient accumulation, mixed precision and FSDP against a real ``tokenbridge serve`` process (a
tiny GPT-2 teacher; a tiny Llama-architecture student on Mistral's tokenizer, as in
``test_train.py``).

Accumulation is checked at the step: micro-batches of unequal size give the whole batch's
gradient. FSDP runs two gloo ranks on the CPU under ``torchrun`` and is compared with DDP on the
same configuration, through a checkpoint, a resume and the exported model.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.rollout import sample
from tokenbridge.client.step import _rows, accumulate_gradients, loss_positions
from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
from tokenbridge.client.train import main as train_main

from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import free_port, serve_process, tiny_teacher

pytestmark = [pytest.mark.e2e, pytest.mark.process]

PROMPTS = ["1 + 2 =", "The cat", "Once upon a time", "def add(a, b):", "Paris is", "Hello"]


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = ["--teacher", str(tiny_teacher("gpt2")), "--data-dir", str(folder / "data"),
            "--max-top-k", "16"]  # fmt: skip
    with serve_process(args, folder) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def student_dir():
    return tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)


def _student(student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)


@pytest.mark.parametrize(
    ("loss", "samples"), [("candidate_reverse_kl", 1), ("reverse_kl", 2), ("forward_kl", 1)]
)
def test_micro_batches_give_the_whole_batch_gradient(loss, samples, student_dir, service_url):
    tokenizer, model = _student(student_dir)
    cfg = TrainConfig(student=str(student_dir), teacher_urls=(service_url,), loss=loss, top_k=8,
                      samples_per_prompt=samples, batch_size=6, progress=False)  # fmt: skip
    torch.manual_seed(0)
    prompts = [p for p in PROMPTS for _ in range(samples)]
    candidates = cfg.candidates if loss == "candidate_reverse_kl" else 0
    rollout = sample(model, tokenizer, prompts, max_new_tokens=12, candidates=candidates)
    with SyncTeacherClient(TeacherClientConfig(urls=(service_url,), top_k=8), tokenizer) as c:
        scored = c.score(rollout.score_sequences()).sequences
    # Four micro-batches of whole prompt groups (2, 2, 1, 1 prompts) with unequal valid positions:
    # an unweighted mean of their losses would not be the batch's.
    rows = len(prompts)
    edges = [0, 2 * samples, 4 * samples, 5 * samples, rows]
    counts = [
        loss_positions(cfg, _rows(rollout, a, b), scored[a:b]) for a, b in itertools.pairwise(edges)
    ]
    assert len(set(counts)) > 1 and sum(counts) > 0, counts

    grads, params, losses = [], [], []
    for accum in (1, 4):
        trained = copy.deepcopy(model)
        trained.train()
        # Plain SGD: Adam's first step is about lr·sign(g), so entries whose gradient is
        # ~1e-8 can move by up to lr apart on rounding alone (2.5e-5 at lr 1e-3 measured).
        optimiser = torch.optim.SGD(trained.parameters(), lr=0.1)
        output = accumulate_gradients(
            dataclasses.replace(cfg, grad_accum_steps=accum), trained, rollout, scored
        )
        grads.append({n: p.grad.clone() for n, p in trained.named_parameters()})
        optimiser.step()
        params.append({n: p.detach().clone() for n, p in trained.named_parameters()})
        losses.append(output)
    whole, split = losses
    assert split.metrics["valid_tokens"] == whole.metrics["valid_tokens"] == sum(counts)
    assert float(split.loss) == pytest.approx(float(whole.loss), rel=1e-5, abs=1e-7)
    scale = max(g.abs().max() for g in grads[0].values())
    assert scale > 0
    grad_error = max((grads[0][n] - grads[1][n]).abs().max() for n in grads[0])
    param_error = max((params[0][n] - params[1][n]).abs().max() for n in params[0])
    print(f"{loss}: max |grad| {scale:.3g}, differences: grad {grad_error:.3g}, "
          f"weights {param_error:.3g}")  # fmt: skip
    assert grad_error <= 1e-6 * scale
    assert param_error <= 1e-6


def test_bf16_mixed_precision_trains_with_finite_losses(student_dir, service_url, tmp_path):
    cfg = TrainConfig(
        student=str(student_dir), teacher_urls=(service_url,), top_k=8, steps=2, batch_size=2,
        max_new_tokens=12, eval_prompts=2, eval_every=2, out_dir=tmp_path, progress=False,
        learning_rate=1e-3, mixed_precision="bf16", grad_accum_steps=2,
    )  # fmt: skip
    summary = train_main(cfg)
    records = [json.loads(line) for line in summary.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert torch.isfinite(torch.tensor([record["loss"], record["grad_norm"]])).all(), record
        assert record["valid_tokens"] > 0
    assert torch.isfinite(torch.tensor(records[-1]["eval_reverse_kl_per_token"]))
    # The weights stay float32 and move.
    _, initial = _student(student_dir)
    trained = torch.load(summary.checkpoint_path, weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert any(not torch.equal(v, trained[k]) for k, v in initial.state_dict().items())


def test_the_new_settings_are_checked():
    base = {"student": "s", "teacher_urls": ("http://t",)}
    with pytest.raises(ValueError, match="sharding must be one of"):
        TrainConfig(**base, sharding="zero3")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig(**base, mixed_precision="fp16")
    with pytest.raises(ValueError, match=r"grad_accum_steps must lie in \[1, batch_size = 4\]"):
        TrainConfig(**base, batch_size=4, grad_accum_steps=5)
    with pytest.raises(ValueError, match=r"LoRA .* trains under DDP only"):
        TrainConfig(**base, sharding="fsdp", lora_r=8)
    with pytest.raises(ValueError, match="sharding fsdp samples with the transformers sampler"):
        TrainConfig(**base, sharding="fsdp", sampler="vllm")


def _torchrun(student_dir, service_url, out_dir, *flags):
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(free_port()), "-m", "tokenbridge", "train", "--student", str(student_dir),
        "--teacher-urls", service_url, "--batch-size", "2", "--max-new-tokens", "8",
        "--top-k", "4", "--eval-prompts", "2", "--eval-every", "1", "--learning-rate", "1e-3",
        "--checkpoint-every", "1", "--out-dir", str(out_dir), "--no-progress", *flags,
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out_dir / "checkpoint.pt", weights_only=False)


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _optimiser_difference(a, b):
    assert a["state"].keys() == b["state"].keys()
    return max(_max_difference(a["state"][i], b["state"][i]) for i in a["state"])


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_and_exports(student_dir, service_url, tmp_path):
    from transformers import AutoModelForCausalLM

    # One step each: the same rollouts on each rank, so the same update.
    ddp = _torchrun(student_dir, service_url, tmp_path / "ddp", "--steps", "1")
    fsdp = _torchrun(student_dir, service_url, tmp_path / "fsdp", "--steps", "1",
                     "--sharding", "fsdp")  # fmt: skip
    assert fsdp["step"] == ddp["step"] == 1 and len(fsdp["rng"]) == 2
    # The same format: full tensors, the optimiser keyed by position.
    assert fsdp["optimiser"]["param_groups"] == ddp["optimiser"]["param_groups"]
    model_1 = _max_difference(fsdp["model"], ddp["model"])
    optimiser_1 = _optimiser_difference(fsdp["optimiser"], ddp["optimiser"])
    _, initial = _student(student_dir)
    moved = _max_difference(fsdp["model"], initial.state_dict())

    # Each resumes for a second step; FSDP's in two micro-batches, reduced once.
    shutil.rmtree(tmp_path / "ddp" / "model")
    ddp = _torchrun(student_dir, service_url, tmp_path / "ddp", "--steps", "2", "--resume")
    fsdp = _torchrun(student_dir, service_url, tmp_path / "fsdp", "--steps", "2", "--resume",
                     "--sharding", "fsdp", "--grad-accum-steps", "2")  # fmt: skip
    assert fsdp["step"] == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "fsdp" / "metrics.jsonl").open()]
    assert steps == [1, 2]  # no step lost, none repeated
    model_2 = _max_difference(fsdp["model"], ddp["model"])
    optimiser_2 = _optimiser_difference(fsdp["optimiser"], ddp["optimiser"])
    print(f"FSDP vs DDP: moved {moved:.3g}; step 1 weights {model_1:.3g}, "
          f"Adam moments {optimiser_1:.3g}; step 2 weights {model_2:.3g}, "
          f"Adam moments {optimiser_2:.3g}")  # fmt: skip
    assert moved > 5e-5  # the first step's rate is 1e-4 (warm-up)
    assert max(model_1, model_2) <= 1e-6 and max(optimiser_1, optimiser_2) <= 1e-6

    # The exported folder holds the checkpoint's (gathered) weights.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    assert _max_difference(exported.state_dict(), fsdp["model"]) == 0


@pytest.mark.slow
def test_fsdp_with_bf16_trains_with_finite_losses(student_dir, service_url, tmp_path):
    state = _torchrun(student_dir, service_url, tmp_path, "--steps", "2", "--sharding", "fsdp",
                      "--mixed-precision", "bf16", "--grad-accum-steps", "2")  # fmt: skip
    assert state["step"] == 2
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    for record in records:
        assert torch.isfinite(torch.tensor([record["loss"], record["grad_norm"]])).all(), record
    assert torch.isfinite(torch.tensor(records[-1]["eval_reverse_kl_per_token"]))
