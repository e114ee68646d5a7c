"""Processes killed mid-training and started again: no step is lost or repeated.

A tiny GPT-2 teacher behind a real ``tokenbridge serve`` process, and a tiny Llama-architecture
student on Mistral's SentencePiece tokenizer. The service is killed (SIGKILL) mid-run and comes
back on the same port and data folder: the trainer rides it out and the student's registration
was read back from the data folder, not registered again. The trainer is killed (SIGKILL) mid-run
and started again with ``--resume``: the run ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.train import main as train_main

from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import free_port, serve_process, tiny_teacher

pytestmark = [pytest.mark.fault, pytest.mark.process]

JSON = {"accept": "application/json"}


@pytest.fixture(scope="module")
def student_dir() -> Path:
    return tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)


def train_values(student_dir: Path, url: str, out_dir: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "student": str(student_dir),
        "teacher_urls": (url,),
        "top_k": 8,
        "steps": 6,
        "batch_size": 2,
        "max_new_tokens": 12,
        "eval_prompts": 0,
        "checkpoint_every": 1,
        "out_dir": out_dir,
        "progress": False,
        "learning_rate": 1e-3,
        "pipeline_depth": 1,
    }
    values.update(overrides)
    return values


def serve_args(data_dir: Path) -> list[str]:
    return [
        "--teacher",
        str(tiny_teacher("gpt2")),
        "--data-dir",
        str(data_dir),
        "--max-top-k",
        "16",
    ]


def steps_logged(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def wait_for_steps(metrics: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(steps_logged(metrics)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} steps in {timeout} s"
        time.sleep(0.05)


def registrations(url: str) -> list[tuple[str, float]]:
    listed = httpx.get(url + "/v1/tokenizers", headers=JSON, timeout=30).json()["tokenizers"]
    return [(entry["id"], entry["created"]) for entry in listed]


def test_training_survives_a_teacher_killed_and_restarted(student_dir, tmp_path):
    """The service dies mid-run (SIGKILL) and comes back on the same port and data folder: the
    trainer waits, sends the lost calls again, no step is lost or repeated, and the student's
    registration is the one stored before the kill, read back from the data folder."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = serve_args(tmp_path / "data")
    config = TrainConfig(**train_values(student_dir, url, tmp_path / "run"))
    outcome: dict[str, Any] = {}
    trainer = threading.Thread(target=lambda: outcome.setdefault("summary", train_main(config)))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with serve_process(args, tmp_path, port=port) as (_, first, log_path):
        trainer.start()
        wait_for_steps(metrics, 2)
        before = registrations(url)
        first.kill()
        first.wait(30)
    assert len(before) == 1  # the trainer registered its student
    time.sleep(2)
    with serve_process(args, tmp_path, port=port):  # same port, same data folder
        after = registrations(url)
        trainer.join(600)
    assert not trainer.is_alive()
    assert outcome["summary"].steps == 6
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # The outage was seen and ridden out: retried connections or calls sent again.
    last = records[-1]
    assert last["teacher_retries_total"] + last["teacher_resubmits_total"] > 0
    # The registry is intact: the same registration (same id, same creation time) was listed as
    # soon as the new process was ready, loaded from the data folder at start-up; the trainer
    # never had to register its student again.
    assert after == before
    assert last["teacher_reregistrations_total"] == 0
    starts = [line for line in log_path.read_text().splitlines() if '"message": "ready:' in line]
    assert len(starts) == 2
    assert "0 stored students" in starts[0] and "1 stored students" in starts[1]


@pytest.mark.slow  # about a minute: an unbroken run, the killed one, and the resumed one
def test_a_trainer_killed_mid_run_resumes_exactly(student_dir, tmp_path):
    """``tokenbridge train`` is killed (SIGKILL) mid-run; ``--resume`` against the live service
    continues from its last checkpoint: every step once, the same weights as an unbroken run."""
    with serve_process(serve_args(tmp_path / "data"), tmp_path) as (url, _, _):
        straight = train_main(TrainConfig(**train_values(student_dir, url, tmp_path / "straight")))

        values = train_values(student_dir, url, tmp_path / "killed")
        toml = tmp_path / "train.toml"
        toml.write_text(
            "".join(
                f"{name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}\n"
                for name, value in {**values, "out_dir": str(values["out_dir"])}.items()
            )
        )
        metrics = tmp_path / "killed" / "metrics.jsonl"
        env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR), "OMP_NUM_THREADS": "1"}
        with (tmp_path / "train.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tokenbridge", "train", "--config", str(toml)],
                cwd=REPO, env=env, stdout=log, stderr=log,
            )  # fmt: skip
            try:
                wait_for_steps(metrics, 2)
            finally:
                process.kill()
                process.wait(30)
        checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
        assert 1 <= checkpoint["step"] < 6, "the trainer was not killed mid-run"

        resumed = train_main(dataclasses.replace(TrainConfig(**values), resume=True))
    assert resumed.steps == 6
    assert steps_logged(metrics) == [1, 2, 3, 4, 5, 6]  # no step lost, none repeated
    a = torch.load(straight.checkpoint_path, weights_only=False)["model"]
    b = torch.load(resumed.checkpoint_path, weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
