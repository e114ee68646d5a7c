"""The trainer against a real ``tokenbridge serve`` process: a tiny GPT-2 teacher and a tiny
Llama-architecture student on Mistral's SentencePiece tokenizer (two families). Two steps of every
loss, exact resume, the command line with a config file, the plot, and two gloo ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tokenbridge.client.config import LOSSES, TrainConfig
from tokenbridge.client.train import main as train_main

from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import free_port, serve_process, tiny_teacher

pytestmark = [pytest.mark.e2e, pytest.mark.process]


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = [
        "--teacher",
        str(tiny_teacher("gpt2")),
        "--data-dir",
        str(folder / "data"),
        "--max-top-k",
        "16",
    ]
    with serve_process(args, folder) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def student_dir():
    return tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)


def _config(student_dir, service_url, out_dir, **overrides):
    values = {
        "student": str(student_dir),
        "teacher_urls": (service_url,),
        "top_k": 8,
        "steps": 2,
        "batch_size": 2,
        "max_new_tokens": 12,
        "eval_prompts": 2,
        "eval_every": 2,
        "checkpoint_every": 1,
        "out_dir": out_dir,
        "progress": False,
        "learning_rate": 1e-3,
    }
    values.update(overrides)
    return TrainConfig(**values)


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.parametrize("loss", LOSSES)
def test_two_steps_of_every_loss(loss, student_dir, service_url, tmp_path):
    summary = train_main(_config(student_dir, service_url, tmp_path, loss=loss))
    assert summary.steps == 2
    records = [json.loads(line) for line in summary.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert torch.isfinite(torch.tensor(record["loss"])), record
        assert 0 <= record["teacher_wait_fraction"] <= 1
    assert summary.teacher_tokens > 0 and summary.student_tokens > 0
    assert "eval_reverse_kl_per_token" in records[-1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard too
    before = _initial_weights(student_dir)
    after = _weights(summary.checkpoint_path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight moved"


def test_the_candidate_loss_with_its_rest_term_reports_it(student_dir, service_url, tmp_path):
    summary = train_main(_config(student_dir, service_url, tmp_path, rest_divergence=True))
    records = [json.loads(line) for line in summary.metrics_path.read_text().splitlines()]
    for record in records:
        assert torch.isfinite(torch.tensor(record["loss"])), record
        # A tiny fresh student's top-16 of 32k ids holds little mass: samples land in the rest.
        assert record["rest_divergence"] != 0.0, record
        assert record["loss"] == pytest.approx(
            record["divergence"] + record["rest_divergence"], rel=1e-4
        )


def _initial_weights(student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student_dir).state_dict()


def test_resume_continues_exactly(student_dir, service_url, tmp_path):
    straight = train_main(
        _config(student_dir, service_url, tmp_path / "straight", steps=4, pipeline_depth=1)
    )
    train_main(_config(student_dir, service_url, tmp_path / "split", steps=2, pipeline_depth=1))
    split = _config(student_dir, service_url, tmp_path / "split", steps=4, pipeline_depth=1)
    resumed = train_main(dataclasses.replace(split, resume=True))
    assert resumed.steps == 4
    a, b = _weights(straight.checkpoint_path), _weights(resumed.checkpoint_path)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(x)["step"] for x in resumed.metrics_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no step lost, none repeated


def test_command_line_with_config_file_and_plot(student_dir, service_url, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        f'student = "{student_dir}"\nteacher_urls = ["{service_url}"]\nsteps = 1\n'
        f'batch_size = 2\nmax_new_tokens = 8\ntop_k = 4\nout_dir = "{tmp_path / "run"}"\n'
        "eval_prompts = 2\n"
    )
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenbridge",
            "train",
            "--config",
            str(config),
            "--loss",
            "jsd",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "trained 1 steps" in run.stdout
    png = tmp_path / "curves.png"
    plotted = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenbridge",
            "plot",
            str(tmp_path / "run" / "metrics.jsonl"),
            "--out",
            str(png),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_gloo_ranks_train_together(student_dir, service_url, tmp_path):
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "tokenbridge",
            "train",
            "--student",
            str(student_dir),
            "--teacher-urls",
            service_url,
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--max-new-tokens",
            "8",
            "--top-k",
            "4",
            "--eval-prompts",
            "0",
            "--out-dir",
            str(tmp_path / "ddp"),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2
    # The two ranks sampled different prompts: their saved RNG states differ.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_a_run_leaves_as_a_hugging_face_model(student_dir, service_url, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train_main(_config(student_dir, service_url, tmp_path / "run"))
    trained = _weights(summary.checkpoint_path)
    folder = tmp_path / "run" / "model"
    assert (folder / "model.safetensors").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    initial = _initial_weights(student_dir)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "no weight moved"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(student_dir).get_vocab()
    prompt = tokenizer("1 + 2 =", return_tensors="pt")
    generated = loaded.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    # `tokenbridge export` makes the same folder from the checkpoint alone; a folder without
    # one is refused with the reason.
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR)}
    exported = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "export", str(tmp_path / "run"), "--out",
         str(exported)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in again)
    refused = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "export", str(tmp_path), "--out",
         str(tmp_path / "nothing")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "no checkpoint.pt in" in refused.stderr
    assert not (tmp_path / "nothing").exists()


def _lora(student_dir, service_url, out_dir, **overrides):
    return _config(student_dir, service_url, out_dir, lora_r=4, lora_alpha=8, **overrides)


def test_a_lora_run_trains_only_its_adapters_resumes_exactly_and_merges(
    student_dir, service_url, tmp_path
):
    from transformers import AutoModelForCausalLM

    straight = train_main(_lora(student_dir, service_url, tmp_path / "straight", steps=4))
    train_main(_lora(student_dir, service_url, tmp_path / "split", steps=2))
    split = _lora(student_dir, service_url, tmp_path / "split", steps=4)
    resumed = train_main(dataclasses.replace(split, resume=True))
    state = torch.load(straight.checkpoint_path, weights_only=False)
    a, b = state["model"], _weights(resumed.checkpoint_path)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert state["lora"] == {"r": 4, "alpha": 8, "target_modules": []}

    # The student's own weights are where they started; the adapters moved (B starts at zero).
    initial = _initial_weights(student_dir)
    adapters = {k: v for k, v in a.items() if "lora_" in k}
    assert adapters and all(k.endswith(("lora_A.default.weight", "lora_B.default.weight"))
                            for k in adapters)  # fmt: skip
    assert any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)
    for name, value in a.items():
        if "lora_" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, initial[plain]), name
    # Only the adapters have optimiser state.
    assert len(state["optimiser"]["state"]) == len(adapters)

    # The run's folder is its adapter; `tokenbridge export --merge` a plain model whose
    # outputs are the LoRA model's.
    assert (tmp_path / "straight" / "model" / "adapter_config.json").is_file()
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR)}
    merged_dir = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "export", str(tmp_path / "straight"), "--out",
         str(merged_dir), "--merge"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (merged_dir / "adapter_config.json").exists()
    from peft import AutoPeftModelForCausalLM

    lora_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "straight" / "model")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    untrained = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723]])
    with torch.no_grad():
        want = lora_model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        before = untrained(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-4


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        TrainConfig(student="s", teacher_urls=("http://t",), lora_r=-1)
    with pytest.raises(ValueError, match="transformers sampler only"):
        TrainConfig(student="s", teacher_urls=("http://t",), lora_r=8, sampler="vllm")
