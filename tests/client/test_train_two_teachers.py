"""The trainer distilling from two teachers of one real ``tokenbridge serve`` process: ``a``, a tiny
GPT-2 (byte-level BPE), and ``b``, a tiny Llama over the Llama-3 tokenizer, for a tiny student on
Mistral's SentencePiece tokenizer. Prompt rows that carry ``"teacher": "b"`` go to ``b`` whatever
the schedule; ``metrics.jsonl`` says which teacher scored what, and the counts add up. Both
schedules, from the command line and in process, with SFT's generation split between teachers
and a resumed mixture routing every prompt as before."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.train import main as train_main

from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import serve_process, tiny_teacher

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.process]

BATCH = 3
#: Prompt rows: the first two are held out (one names ``b``); three of the ten others name ``b``.
ROWS = [
    {"prompt": "HAMLET.\nTo be, or not to be,"},
    {"prompt": "GHOST.\nMark me.", "teacher": "b"},
    {"prompt": "OPHELIA.\nGood my lord,"},
    {"prompt": "HORATIO.\nHail to your lordship!", "teacher": "b"},
    {"prompt": "POLONIUS.\nThough this be madness,"},
    {"prompt": "GERTRUDE.\nGood Hamlet, cast thy nighted colour off,"},
    {"prompt": "LAERTES.\nMy necessaries are embark'd.", "teacher": "b"},
    {"prompt": "BERNARDO.\nWho's there?"},
    {"prompt": "FRANCISCO.\nNay, answer me."},
    {"prompt": "MARCELLUS.\nSomething is rotten in the state of Denmark.", "teacher": "b"},
    {"prompt": "HAMLET.\nSpeak the speech, I pray you."},
    {"prompt": "ROSENCRANTZ.\nMy honoured lord!"},
]
FIELD_ROWS_TRAINED = sum("teacher" in row for row in ROWS[2:])


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = [
        "--teacher", f"a={tiny_teacher('gpt2')}",
        "--teacher", f"b={tiny_teacher('llama3', 'llama')}",
        "--data-dir", str(folder / "data"),
        "--max-top-k", "16",
    ]  # fmt: skip
    with serve_process(args, folder) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def student_dir():
    return tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_counts_add_up(records, summary_teachers=None):
    """Every step's teachers scored its whole batch; the per-teacher tokens add up to the run's."""
    for record in records:
        teachers = record["teachers"]
        assert sum(t["sequences"] for t in teachers.values()) == BATCH, record
        assert sum(t["student_tokens"] for t in teachers.values()) == record["student_tokens"]
        for counts in teachers.values():
            assert counts["sequences"] > 0 and 0 <= counts["by_field"] <= counts["sequences"]
            assert counts["teacher_tokens"] > 0  # every teacher call was counted
    teacher_tokens = sum(t["teacher_tokens"] for r in records for t in r["teachers"].values())
    assert teacher_tokens == records[-1]["teacher_tokens_total"]
    if summary_teachers is not None:
        for name, totals in summary_teachers.items():
            for key in ("sequences", "by_field", "student_tokens", "teacher_tokens"):
                assert totals[key] == sum(
                    r["teachers"].get(name, {}).get(key, 0) for r in records
                ), (name, key)


def test_round_robin_from_the_command_line_with_rows_naming_their_teacher(
    service_url, student_dir, prompts_path, tmp_path
):
    out = tmp_path / "run"
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR)}
    run = subprocess.run(
        [
            sys.executable, "-m", "tokenbridge", "train",
            "--student", str(student_dir), "--teacher-urls", service_url,
            "--teachers", "a", "b", "--teacher-schedule", "round_robin",
            "--prompts", str(prompts_path), "--eval-prompts", "2", "--eval-every", "4",
            "--steps", "4", "--batch-size", str(BATCH), "--max-new-tokens", "8", "--top-k", "8",
            "--out-dir", str(out), "--no-progress",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    records = _records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    _check_counts_add_up(records)
    for record in records:
        teachers = record["teachers"]
        if record["step"] % 2 == 1:
            # The schedule's turn of ``a``: whatever ``b`` scored came from rows naming it.
            assert teachers["a"]["by_field"] == 0
            if "b" in teachers:
                assert teachers["b"]["by_field"] == teachers["b"]["sequences"]
        else:
            assert set(teachers) == {"b"}  # ``b``'s turn: the whole batch
        for counts in teachers.values():
            assert "teacher_logprob_per_token" in counts and "reverse_kl_per_token" in counts
    scored = {
        name: sum(r["teachers"].get(name, {}).get("sequences", 0) for r in records)
        for name in ("a", "b")
    }
    assert scored["a"] > 0 and scored["b"] > 0 and sum(scored.values()) == 4 * BATCH
    # 12 prompts from 10 training rows: every row once, so each row naming ``b`` went to ``b``.
    by_field = sum(r["teachers"].get("b", {}).get("by_field", 0) for r in records)
    assert by_field >= FIELD_ROWS_TRAINED
    assert sum(r["teachers"].get("a", {}).get("by_field", 0) for r in records) == 0
    # The held-out prompts: the plain one against ``a``, the one naming ``b`` against ``b``.
    final = records[-1]
    assert {"eval_reverse_kl_per_token@a", "eval_reverse_kl_per_token@b"} <= set(final)
    assert "trained 4 steps" in run.stdout


def _config(student_dir, service_url, prompts_path, out_dir, **overrides):
    values = {
        "student": str(student_dir),
        "teacher_urls": (service_url,),
        "teachers": ("a", "b"),
        "prompts": prompts_path,
        "top_k": 8,
        "steps": 4,
        "batch_size": BATCH,
        "max_new_tokens": 8,
        "eval_prompts": 2,
        "eval_every": 100,
        "checkpoint_every": 1,
        "pipeline_depth": 1,
        "out_dir": out_dir,
        "progress": False,
        "learning_rate": 1e-3,
    }
    values.update(overrides)
    return TrainConfig(**values)


def test_a_resumed_mixture_routes_every_prompt_as_before(
    service_url, student_dir, prompts_path, tmp_path
):
    mixture = {"teacher_schedule": "mixture", "teacher_weights": (1.0, 2.0)}
    straight = train_main(
        _config(student_dir, service_url, prompts_path, tmp_path / "straight", **mixture)
    )
    train_main(_config(student_dir, service_url, prompts_path, tmp_path / "split", steps=2,
                       **mixture))  # fmt: skip
    split = _config(student_dir, service_url, prompts_path, tmp_path / "split", **mixture)
    resumed = train_main(dataclasses.replace(split, resume=True))
    whole, again = _records(straight.metrics_path), _records(resumed.metrics_path)
    assert [r["step"] for r in again] == [1, 2, 3, 4]

    def routing(records):
        return [
            {name: (c["sequences"], c["by_field"]) for name, c in r["teachers"].items()}
            for r in records
        ]

    # Steps 3 and 4 ran after the resume (step 3's rollout came back from the checkpoint).
    assert routing(again) == routing(whole)
    assert {name for r in whole for name in r["teachers"]} == {"a", "b"}
    _check_counts_add_up(whole, straight.teachers)
    _check_counts_add_up(again, resumed.teachers)
    assert resumed.teachers == straight.teachers
    a = torch.load(straight.checkpoint_path, weights_only=False)["model"]
    b = torch.load(resumed.checkpoint_path, weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_sft_splits_the_teacher_samples_between_the_teachers(
    service_url, student_dir, prompts_path, tmp_path
):
    sft = {"loss": "sft", "steps": 2, "eval_prompts": 0, "checkpoint_every": 2}
    summary = train_main(_config(student_dir, service_url, prompts_path, tmp_path, **sft))
    records = _records(summary.metrics_path)
    # Without held-out prompts every row trains: the first step mixes ``a``'s share with rows
    # naming ``b``, or is all ``a``; the second is all ``b``.
    assert set(records[1]["teachers"]) == {"b"}
    assert "a" in records[0]["teachers"]
    for record in records:
        for counts in record["teachers"].values():
            assert counts["teacher_tokens"] > 0 and counts["student_tokens"] > 0
            assert "teacher_logprob_per_token" not in counts  # generation scores nothing
    assert sum(summary.teachers[n]["sequences"] for n in summary.teachers) == 2 * BATCH
    assert summary.teacher_tokens == sum(t["teacher_tokens"] for t in summary.teachers.values())
