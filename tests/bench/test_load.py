"""``bench/load.py``: concurrent students of three tokenizer families against a real ``tokenbridge
serve`` process, with an admission limit small enough to refuse some requests. Every refusal is
retried, nothing is lost, and the service's own counts match the client's. The accounting itself
(retries, losses, answer validation) is checked first on mock transports."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.shared.codec import pack

from bench import load
from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import tiny_teacher

pytestmark = pytest.mark.e2e

ROWS, K, VOCAB = 3, 4, 100

RESULT_KEYS = {
    "benchmark", "machine", "teacher", "service", "students", "tokenizers", "duration_s",
    "requests", "answered", "refused_retried", "attempts", "statuses", "refusals", "errors",
    "lost", "server_errors", "server", "accounting_matches", "refusals_without_retry_after",
    "latency_ms", "attempt_latency_ms", "refusal_latency_ms", "positions", "positions_per_s",
    "teacher_tokens", "teacher_tokens_per_s", "per_student", "registrations",
}  # fmt: skip


def _body() -> dict:
    sequence = {"prompt": {"text": "HAMLET.\n"}, "completion_ids": np.arange(ROWS)}
    return {"student_tokenizer": "s", "top_k": K, "sequences": [sequence, sequence]}


def _answer(**changes: object) -> dict:
    """A valid score answer for ``_body()``; ``changes`` overrides fields of each sequence."""
    sequence = {
        "logprobs": np.full(ROWS, -1.5, dtype=np.float32),
        "topk_ids": np.tile(np.arange(K), (ROWS, 1)),
        "topk_logprobs": np.full((ROWS, K), -2.0, dtype=np.float16),
        "chunk_ids": np.arange(ROWS),
        "tail_mass": np.zeros(ROWS, dtype=np.float16),
        "unresolved_mass": np.zeros(ROWS, dtype=np.float16),
        "exact": np.ones(ROWS, dtype=bool),
        "chunk_logprobs": np.full(ROWS, -1.5, dtype=np.float32),
        "alignment": {"untiled_bytes": 0},
        **changes,
    }
    return {
        "top_k": K,
        "sequences": [sequence, sequence],
        "usage": {"positions": 2 * ROWS, "teacher_tokens": 20},
    }


STUDENT = load.Student(0, "gpt2", "hamlet", VOCAB, [])


def test_validate_accepts_a_right_answer():
    assert load._validate(_answer(), _body(), VOCAB) == (2 * ROWS, 20, 0)


@pytest.mark.parametrize(
    "answer",
    [
        _answer(logprobs=np.full(ROWS - 1, -1.0, dtype=np.float32)),
        _answer(topk_ids=np.tile(np.arange(K - 1), (ROWS, 1))),
        _answer(logprobs=np.array([-1.0, 0.5, -1.0], dtype=np.float32)),
        _answer(logprobs=np.array([-1.0, np.nan, -1.0], dtype=np.float32)),
        _answer(topk_ids=np.tile(np.arange(VOCAB, VOCAB + K), (ROWS, 1))),
        {**_answer(), "sequences": _answer()["sequences"][:1]},
        {**_answer(), "usage": {"positions": 1, "teacher_tokens": 20}},
        {**_answer(), "top_k": K + 1},
    ],
    ids=["rows", "k", "positive", "nan", "vocab", "sequences", "usage", "top_k"],
)
def test_validate_rejects_a_wrong_answer(answer):
    with pytest.raises(load.BadAnswerError):
        load._validate(answer, _body(), VOCAB)


def test_validate_checks_which_teacher_answered():
    answer = {**_answer(), "teacher": {"name": "t1", "model": "m"}}
    assert load._validate(answer, _body(), VOCAB, "t1") == (2 * ROWS, 20, 0)
    for wrong in (answer, _answer(), {**_answer(), "teacher": "t0"}):
        with pytest.raises(load.BadAnswerError, match="teacher 't0' asked"):
            load._validate(wrong, _body(), VOCAB, "t0")


def test_students_are_assigned_to_teachers_with_their_own_limits():
    args = load.parse_args(
        ["--teachers", "2", "--teacher-students", "7,1", "--teacher-max-tokens-in-flight",
         "1000,", "--teacher-admission-wait-s", ",0", "--teacher-options", "t1.max_top_k=32"]
    )  # fmt: skip
    assert args.students == 8 and args.teacher_names == ["t0", "t1"]
    assert args.student_teachers == [0] * 7 + [1]
    serve = load._serve_args(args, [REPO / "a", REPO / "b"], REPO / "data")
    options = [serve[i + 1] for i, flag in enumerate(serve) if flag == "--teacher-options"]
    assert options == ["t0.max_tokens_in_flight=1000", "t1.admission_wait_s=0.0", "t1.max_top_k=32"]
    assert [serve[i + 1] for i, flag in enumerate(serve) if flag == "--teacher"] == [
        f"t0={REPO / 'a'}",
        f"t1={REPO / 'b'}",
    ]
    round_robin = load.parse_args(["--teachers", "3", "--students", "5"])
    assert round_robin.student_teachers == [0, 1, 2, 0, 1]
    # One teacher: passed bare (it is the service's "default") and requests name none.
    single = load.parse_args(["--students", "2"])
    assert single.teacher_names == ["default"] and single.student_teachers == [0, 0]
    assert load._serve_args(single, [REPO / "a"], REPO / "data")[:2] == [
        "--teacher",
        str(REPO / "a"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--teachers", "2", "--teacher-students", "7"],
        ["--teachers", "2", "--teacher-students", "7,0"],
        ["--teachers", "2", "--teacher-students", "7,1", "--students", "9"],
        ["--teachers", "2", "--teacher-max-tokens-in-flight", "1000"],
        ["--teachers", "2", "--teacher-max-tokens-in-flight", "1000,lots"],
        ["--teacher-max-tokens-in-flight", "1000"],
        ["--teachers", "0"],
    ],
)
def test_bad_teacher_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        load.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_validate_allows_unscored_rows_only_where_bytes_are_untiled():
    nan = np.array([-1.0, np.nan, -1.0], dtype=np.float32)
    answer = _answer(logprobs=nan, alignment={"untiled_bytes": 2})
    assert load._validate(answer, _body(), VOCAB) == (2 * ROWS, 20, 2)


def _tally_of(replies: list[Callable[[], httpx.Response]], max_retries: int = 3) -> load.Tally:
    """One logical request against a mock service that gives ``replies`` in turn."""
    calls = iter(replies)

    def handler(request: httpx.Request) -> httpx.Response:
        return next(calls)()

    async def run() -> load.Tally:
        tally = load.Tally()
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://mock") as http:
            retries = load.Retries(max_retries, backoff_base_s=0.0, backoff_max_s=0.0)
            await load._score_once(http, STUDENT, _body(), tally, random.Random(0), retries)
        return tally

    return asyncio.run(run())


def _ok() -> httpx.Response:
    return httpx.Response(200, content=pack(_answer()))


def _refused(status: int = 429, retry_after: str | None = "0") -> Callable[[], httpx.Response]:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return lambda: httpx.Response(status, headers=headers, content=pack({"error": {}}))


def _broken() -> httpx.Response:
    raise httpx.ReadTimeout("no answer")


def test_retries_wait_for_retry_after_and_back_off_with_jitter():
    retries, rng = load.Retries(8, backoff_base_s=0.25, backoff_max_s=1.0), random.Random(0)
    assert retries.wait_s(1, 2.0, rng) == 2.0
    assert 0 <= retries.wait_s(1, None, rng) <= 0.25
    assert all(retries.wait_s(8, 0.0, rng) <= 1.0 for _ in range(100))


def test_refusals_are_retried_and_counted_once():
    tally = _tally_of([_refused(), _refused(503), _refused(retry_after=None), _ok])
    assert (tally.requests, tally.answered, tally.refused_retried, tally.attempts) == (1, 1, 1, 4)
    assert tally.statuses == {"429": 2, "503": 1, "200": 1} and tally.refusals == 3
    assert tally.lost == 0 and tally.missing_retry_after == 1
    assert tally.positions == 2 * ROWS and len(tally.latency_s) == 1


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        ([_refused()] * 4, "retries_exhausted"),
        ([lambda: httpx.Response(500, content=b"")], "http_500"),
        ([_refused(), lambda: httpx.Response(413, content=b"")], "http_413"),
        ([_broken], "exception:ReadTimeout"),
        ([lambda: httpx.Response(200, content=b"\xc1")], "bad_answer:CodecError"),
        ([lambda: httpx.Response(200, content=pack({"top_k": K}))], "bad_answer:BadAnswerError"),
    ],
)
def test_anything_but_an_answer_is_lost(replies, reason):
    tally = _tally_of(replies)
    assert tally.answered == 0 and tally.refused_retried == 0
    assert tally.errors == {reason: 1} and tally.lost == 1


def run_load(*flags: str) -> dict[str, Any]:
    """``bench/load.py`` as a process with ``flags`` for a short run; its JSON result."""
    command = [
        sys.executable, str(REPO / "bench" / "load.py"), *flags,
        "--duration", "6", "--tokenizers", "mistral-v1", "qwen2", "llama3",
        # A data dir kept in the cache: the mapping tables are built by the first run only.
        "--data-dir", str(CACHE_DIR / "test-load-data"), "--cache-dir", str(CACHE_DIR),
        # No line at admission: refused at once, so the refusal path is what this run exercises.
        # Refused students may then wait out the whole run: give them the retries to do so, with
        # short backoffs to keep the test short.
        "--admission-wait-s", "0", "--max-retries", "30", "--backoff-max-s", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.process
@pytest.mark.slow
def test_load_run_retries_every_refusal_and_loses_nothing():
    result = run_load(
        "--students", "3", "--teacher", str(tiny_teacher("gpt2")), "--max-tokens-in-flight", "1000"
    )

    assert not RESULT_KEYS - result.keys(), RESULT_KEYS - result.keys()
    assert result["students"] == 3
    assert result["tokenizers"] == ["mistral-v1", "qwen2", "llama3"]
    assert all(r["status"] in (200, 201) for r in result["registrations"])
    assert result["service"]["max_tokens_in_flight"] == 1000
    assert result["service"]["url"].startswith("http://127.0.0.1:")
    assert result["machine"]["cpus"] >= 1

    assert result["lost"] == 0 and result["errors"] == {}
    assert result["server_errors"] == 0
    assert result["answered"] == result["requests"] > 0
    assert all(s["answered"] >= 1 and s["lost"] == 0 for s in result["per_student"])
    # The admission limit holds about one request: some were refused, and each was retried.
    assert result["refusals"].get("429", 0) > 0
    assert 0 < result["refused_retried"] <= result["refusals"]["429"]
    assert result["attempts"] == result["requests"] + sum(result["refusals"].values())
    assert set(result["statuses"]) <= {"200", "429", "503"}
    assert result["refusals_without_retry_after"] == 0
    assert result["accounting_matches"] is True
    assert result["server"]["score_requests_by_status"] == result["statuses"]

    assert result["positions"] > 0 and result["positions_per_s"] > 0
    assert result["teacher_tokens"] > result["positions"] / 2
    latency, attempt = result["latency_ms"], result["attempt_latency_ms"]
    assert 0 < attempt["p50"] <= latency["max"] and attempt["max"] <= latency["max"]
    assert result["refusal_latency_ms"]["p50"] is not None


@pytest.mark.process
@pytest.mark.slow
def test_load_run_with_two_teachers_keeps_each_teachers_refusals_its_own():
    """A busy teacher (admission limit about one request, three students) refuses; the quiet
    one beside it in the same service (a large limit, one student) refuses nothing."""
    result = run_load(
        "--teachers", "2", "--teacher-students", "3,1",
        "--teacher", str(tiny_teacher("gpt2")), "--teacher", str(tiny_teacher("llama3", "llama")),
        "--teacher-max-tokens-in-flight", "1000,262144",
    )  # fmt: skip

    assert not (RESULT_KEYS | {"teachers"}) - result.keys()
    assert result["lost"] == 0 and result["errors"] == {} and result["server_errors"] == 0
    assert result["answered"] == result["requests"] > 0
    assert result["accounting_matches"] is True
    teachers = result["teachers"]
    assert list(teachers) == ["t0", "t1"]
    assert [s["teacher"] for s in result["per_student"]] == ["t0", "t0", "t0", "t1"]
    busy, quiet = teachers["t0"], teachers["t1"]
    assert (busy["students"], quiet["students"]) == (3, 1)
    assert busy["limits"]["max_tokens_in_flight"] == 1000
    assert quiet["limits"]["max_tokens_in_flight"] == 262144
    assert (busy["vocab_size"], quiet["vocab_size"]) != (None, None)
    assert busy["vocab_size"] != quiet["vocab_size"]  # two tokenizer families
    for teacher in (busy, quiet):
        # Every answer was validated, its teacher name included: a wrong one would be lost.
        assert teacher["lost"] == 0 and teacher["errors"] == {}
        assert teacher["answered"] == teacher["requests"] > 0
        assert teacher["accounting_matches"] is True
        assert teacher["server"]["score_requests_by_status"] == teacher["statuses"]
        assert teacher["server"]["scored_positions"] == teacher["positions"] > 0
        assert teacher["positions_per_s"] > 0
    # Admission is per teacher: the busy one's limit refused its own students only.
    assert busy["refusals"].get("429", 0) > 0 and busy["server"]["rejected"] > 0
    assert quiet["refusals"] == {} and quiet["server"]["rejected"] == 0
    assert quiet["statuses"] == {"200": quiet["answered"]}
    assert sum(t["requests"] for t in teachers.values()) == result["requests"]
