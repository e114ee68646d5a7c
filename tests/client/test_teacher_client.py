"""The teacher client against the real service: replicas in-process (``httpx.ASGITransport`` on
the apps' own event loop, sometimes behind a small ASGI wrapper that answers 503/429/413 first),
and a real ``tokenbridge serve`` process killed and restarted under the blocking facade.

Backoff and ``Retry-After`` are observed through an injected clock and sleep, never wall time.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.client.errors import (
    TeacherConfigError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from tokenbridge.client.teacher import (
    SyncTeacherClient,
    TeacherClient,
    TeacherClientConfig,
    registration_body,
)
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import MSGPACK, pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.paths import CACHE_DIR, REPO
from tests.support.service import (
    config_for,
    free_port,
    running_app,
    wait_ready,
)

pytestmark = pytest.mark.integration

STUDENT = "mistral-v1"
MAX_TOP_K = 16
URL_A, URL_B = "http://replica-a", "http://replica-b"
TEXTS = (
    "To be, or not to be: that is the question.",
    "Good night, sweet prince 1601.",
    "The Globe sold 31536 seats 🎭 to the king.",
    "Words, words, words.",
    "",
)
FIELDS = (
    "logprobs_S", "topk_ids_SK", "topk_logprobs_SK", "chunk_ids_S", "tail_mass_S",
    "unresolved_mass_S", "exact_S", "chunk_logprobs_C",
)  # fmt: skip


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica_a(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("data-a"), max_top_k=MAX_TOP_K)
    with running_app(config, loop=loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def replica_b(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("data-b"), max_top_k=MAX_TOP_K)
    with running_app(config, loop=loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def sequences(bank) -> list[dict[str, Any]]:
    """Five sequences: text prompts, one prompt of student ids, one empty completion."""
    tokenizer, vocab = bank.tokenizer(STUDENT), bank.vocab(STUDENT)
    out: list[dict[str, Any]] = []
    for index, text in enumerate(TEXTS):
        ids = encode_continuation(tokenizer, vocab, text) if text else []
        prompt: dict[str, Any] = {"text": "HAMLET.\n"}
        if index == 1:
            prompt = {"ids": tokenizer.encode("HORATIO.\n", add_special_tokens=False)}
        out.append({"prompt": prompt, "completion_ids": ids})
    return out


@pytest.fixture(scope="module")
def reference(replica_a, sequences):
    """The service's own answer to the five sequences in one direct request, and the student."""

    async def go(client: httpx.AsyncClient) -> tuple[str, list[ScoredSequence]]:
        registered = await client.post("/v1/tokenizers", json={"name": STUDENT, "hub": STUDENT})
        assert registered.status_code in (200, 201), registered.text
        student = registered.json()["id"]
        body = {"student_tokenizer": student, "top_k": 8, "sequences": sequences}
        response = await client.post(
            "/v1/score", content=pack(body), headers={"content-type": MSGPACK}
        )
        assert response.status_code == 200, response.content[:300]
        answer = unpack(response.content)
        return student, [ScoredSequence.from_wire(s, answer["top_k"]) for s in answer["sequences"]]

    return replica_a.run(go)


class FakeTime:
    """A clock that only moves when the client sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


Rule = Callable[[str, Any], tuple[int, dict[str, str]] | None]


class Interposer:
    """An ASGI app in front of a real replica: ``rule(path, body)`` may answer an error instead.

    The request body is read (and replayed to the app when it passes) so rules can look at it.
    """

    def __init__(self, app: Any, rule: Rule) -> None:
        self.app = app
        self.rule = rule
        self.answered: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        decision = self.rule(scope["path"], unpack(raw) if raw else None)
        if decision is not None:
            status, headers = decision
            self.answered.append(status)
            body = pack({"error": {"code": f"test_{status}", "message": f"injected {status}"}})
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", MSGPACK.encode())]
                    + [(k.encode(), v.encode()) for k, v in headers.items()],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def on_score(*answers: tuple[int, dict[str, str]]) -> Rule:
    """A rule answering the given errors to the first score requests, then passing."""
    queue = list(answers)

    def rule(path: str, body: Any) -> tuple[int, dict[str, str]] | None:
        if path == "/v1/score" and queue:
            return queue.pop(0)
        return None

    return rule


def config(*urls: str, **overrides: Any) -> TeacherClientConfig:
    return TeacherClientConfig(urls=urls or (URL_A,), **{"top_k": 8, **overrides})


def assert_same_scores(got: list[ScoredSequence], want: list[ScoredSequence]) -> None:
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=name)
        assert mine.alignment == theirs.alignment


# -- configuration -----------------------------------------------------------------------------


def test_config_is_validated_with_reasons_and_hides_the_key():
    good = TeacherClientConfig(urls=("http://t:8000/",), api_key="secret-key", top_k=4)
    assert good.urls == ("http://t:8000",) and "secret-key" not in repr(good)
    timeout = good.http_timeout
    assert (timeout.connect, timeout.read, timeout.write) == (5.0, 300.0, 300.0)
    assert good.http_limits.max_connections == good.max_concurrency
    for bad, reason in (
        ({"urls": ()}, "at least one"),
        ({"urls": ("t:8000",)}, "http://"),
        ({"urls": ("http://a", "http://a/")}, "distinct"),
        ({"top_k": 0}, "top_k"),
        ({"encoding": "xml"}, "encoding"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"backoff_base_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"),
        ({"api_key": ""}, "api_key"),
    ):
        with pytest.raises(ValueError, match=reason):
            TeacherClientConfig(**bad)


def test_registration_bodies(bank):
    assert registration_body("llama3") == {"name": "llama3", "hub": "llama3"}
    assert registration_body(Path("/models/s"), name="s1") == {"name": "s1", "path": "/models/s"}
    uploaded = registration_body(bank.tokenizer(STUDENT), name="m")
    assert uploaded["special_tokens"]["eos_token"] == "</s>"
    assert uploaded["tokenizer_json"].startswith("{")
    with pytest.raises(ValueError, match="exactly one"):
        registration_body({"name": "x"})
    with pytest.raises(TypeError, match="hub name"):
        registration_body(3.5)


# -- in-process replicas ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_start_registers_the_student_and_scores_like_the_service(
    replica_a, reference, sequences, encoding
):
    student, want = reference

    async def go():
        settings = config(max_sequences_per_request=2, encoding=encoding)
        async with TeacherClient(
            settings, STUDENT, transports=httpx.ASGITransport(app=replica_a.app)
        ) as client:
            assert client.student_id == student
            assert client.teacher_info["max_top_k"] == MAX_TOP_K
            result = await client.score(sequences)
            return result, client.stats

    result, stats = replica_a.loop.run(go())
    assert_same_scores(result.sequences, want)
    assert result.requests == 3 and result.top_k == 8  # 5 sequences in chunks of 2
    assert result.usage["positions"] == sum(len(s["completion_ids"]) for s in sequences)
    assert set(result.timings) == {"prepare_s", "engine_s", "mapping_s"}
    assert result.teacher["backend"] == "transformers"
    assert stats.requests == 5 and stats.retries == 0 and stats.sequences == 5
    assert stats.teacher_wait_s > 0


def test_top_k_above_the_service_maximum_fails_at_start(replica_a):
    async def go():
        async with TeacherClient(
            config(top_k=MAX_TOP_K + 1), STUDENT, transports=httpx.ASGITransport(app=replica_a.app)
        ):
            pass

    with pytest.raises(TeacherConfigError) as caught:
        replica_a.loop.run(go())
    assert f"top_k {MAX_TOP_K + 1}" in str(caught.value)
    assert f"max_top_k {MAX_TOP_K}" in str(caught.value)


def test_clamp_top_k_lowers_it_to_the_service_maximum_and_scores_that_wide(replica_a, sequences):
    """The trainer's candidate loss asks for the teacher's row as wide as the service allows:
    with ``clamp_top_k`` a top_k above the maximum is lowered at start, not refused, and the
    answers are checked against the lowered width."""

    async def go():
        async with TeacherClient(
            config(top_k=MAX_TOP_K + 5, clamp_top_k=True), STUDENT,
            transports=httpx.ASGITransport(app=replica_a.app),
        ) as client:  # fmt: skip
            result = await client.score(sequences[:1])
            return client.config.top_k, result

    top_k, result = replica_a.loop.run(go())
    assert top_k == result.top_k == MAX_TOP_K
    assert result.sequences[0].topk_ids_SK.shape[1] in (MAX_TOP_K, MAX_TOP_K + 1)


def test_a_refused_student_tokenizer_fails_at_start(replica_a):
    async def go():
        async with TeacherClient(
            config(),
            # a folder name in the service's data dir that is not there
            {"name": "gone", "path": "no/such/folder"},
            transports=httpx.ASGITransport(app=replica_a.app),
        ):
            pass

    with pytest.raises(TeacherConfigError, match="refused the student tokenizer 'gone'") as caught:
        replica_a.loop.run(go())
    assert "not a folder on the service" in str(caught.value)
    assert isinstance(caught.value.__cause__, TeacherRequestError)
    assert caught.value.__cause__.status == 422


def test_two_replicas_share_the_work_and_both_get_the_student(
    replica_a, replica_b, sequences, bank
):
    one = sequences[0]

    async def go():
        transports = {
            URL_A: httpx.ASGITransport(app=replica_a.app),
            URL_B: httpx.ASGITransport(app=replica_b.app),
        }
        settings = config(URL_A, URL_B, max_sequences_per_request=1, max_concurrency=4)
        # A tokenizer object: uploaded whole, so each replica builds it from the same JSON.
        async with TeacherClient(settings, bank.tokenizer(STUDENT), transports=transports) as c:
            batch = await c.score([one] * 8)
            after_batch = c.stats.by_replica
            singles = [await c.score([one]) for _ in range(4)]
            return c.student_id, batch, after_batch, singles, c.stats

    student, batch, after_batch, singles, stats = replica_a.loop.run(go())
    for harness in (replica_a, replica_b):
        assert harness.service.registry.get(student).name == STUDENT
    # Concurrent chunks go to the replica with fewer in flight; sequential calls alternate.
    assert after_batch[URL_A] >= 3 and after_batch[URL_B] >= 3
    assert stats.by_replica[URL_A] - after_batch[URL_A] == 2
    assert stats.by_replica[URL_B] - after_batch[URL_B] == 2
    rows = batch.sequences + [s.sequences[0] for s in singles]
    assert_same_scores(rows, [rows[0]] * len(rows))  # same weights, same numbers on both
    assert stats.retries == 0 and stats.failovers == 0


def test_503_and_429_fail_over_to_the_other_replica(replica_a, replica_b, reference, sequences):
    _, want = reference
    flaky = Interposer(
        replica_b.app, on_score((503, {"Retry-After": "2"}), (429, {"Retry-After": "1"}))
    )
    fake = FakeTime()

    async def go():
        transports = {
            URL_A: httpx.ASGITransport(app=replica_a.app),
            URL_B: httpx.ASGITransport(app=flaky),
        }
        async with TeacherClient(
            config(URL_A, URL_B), STUDENT, transports=transports, sleep=fake.sleep, clock=fake.clock
        ) as client:
            results = [await client.score(sequences) for _ in range(3)]
            assert flaky.answered == [503]
            status = {r["url"]: r["up"] for r in client.replica_status()}
            assert status == {URL_A: True, URL_B: False}  # waiting out its Retry-After
            fake.now += 2.5
            results += [await client.score(sequences) for _ in range(3)]
            assert flaky.answered == [503, 429]
            fake.now += 1.5
            results += [await client.score(sequences) for _ in range(3)]
            return results, client.stats

    results, stats = replica_a.loop.run(go())
    for result in results:
        assert_same_scores(result.sequences, want)
    assert stats.retries == 2 and stats.failovers == 2
    assert fake.sleeps == []  # a free replica is tried at once, without backoff
    assert stats.by_replica[URL_B] >= 3  # two refusals, then it served again


def test_422_is_raised_at_once_and_never_retried(replica_a, sequences):
    fake = FakeTime()

    async def go():
        async with TeacherClient(
            config(),
            STUDENT,
            transports=httpx.ASGITransport(app=replica_a.app),
            sleep=fake.sleep,
            clock=fake.clock,
        ) as client:
            before = client.stats.requests
            bad = [sequences[0], {"prompt": {"text": "x"}, "completion_ids": [10**8]}]
            with pytest.raises(TeacherRequestError) as caught:
                await client.score(bad)
            return caught.value, client.stats.requests - before, client.stats

    error, sent, stats = replica_a.loop.run(go())
    assert error.status == 422 and error.code == "unprocessable"
    assert error.message.startswith("completion ids must lie in [0, 32000)"), error.message
    assert sent == 1 and stats.retries == 0 and fake.sleeps == []


def test_retry_after_is_honoured_and_backoff_is_bounded(replica_a, reference, sequences):
    _, want = reference
    fake = FakeTime()
    limited = Interposer(replica_a.app, on_score((429, {"Retry-After": "3"})))

    async def go():
        async with TeacherClient(
            config(), STUDENT, transports=httpx.ASGITransport(app=limited),
            sleep=fake.sleep, clock=fake.clock,
        ) as client:  # fmt: skip
            return await client.score(sequences), client.stats

    result, stats = replica_a.loop.run(go())
    assert_same_scores(result.sequences, want)
    assert len(fake.sleeps) == 1 and fake.sleeps[0] >= 3.0  # the only replica asked for 3 s
    assert stats.retries == 1 and stats.failovers == 0

    # 503 without Retry-After, every time: full-jitter backoff under its caps, then give up.
    fake = FakeTime()
    down = Interposer(replica_a.app, lambda path, body: (503, {}) if path == "/v1/score" else None)
    settings = config(max_retries=4, backoff_base_s=0.5, backoff_max_s=2.0)

    async def exhaust():
        async with TeacherClient(
            settings, STUDENT, transports=httpx.ASGITransport(app=down),
            sleep=fake.sleep, clock=fake.clock, rng=random.Random(7),
        ) as client:  # fmt: skip
            with pytest.raises(TeacherUnavailableError) as caught:
                await client.score(sequences[:1])
            return caught.value

    error = replica_a.loop.run(exhaust())
    assert error.attempts == 5 and len(down.answered) == 5
    assert "HTTP 503" in str(error)
    assert len(fake.sleeps) == 4
    for attempt, slept in enumerate(fake.sleeps, start=1):
        assert 0 <= slept <= min(2.0, 0.5 * 2 ** (attempt - 1))


def test_413_halves_the_request(replica_a, reference, sequences):
    _, want = reference

    def too_big(path: str, body: Any) -> tuple[int, dict[str, str]] | None:
        if path == "/v1/score" and len(body["sequences"]) > 2:
            return 413, {}
        return None

    small = Interposer(replica_a.app, too_big)

    async def go():
        async with TeacherClient(
            config(), STUDENT, transports=httpx.ASGITransport(app=small)
        ) as client:
            return await client.score(sequences), client.stats

    result, stats = replica_a.loop.run(go())
    assert_same_scores(result.sequences, want)  # 5 → 2 + 3 → 2 + 1 + 2, order kept
    assert stats.splits == 2 and small.answered == [413, 413] and result.requests == 3


def test_an_unreachable_replica_is_set_aside_then_checked_again(replica_a, reference, sequences):
    _, want = reference
    dead = f"http://127.0.0.1:{free_port()}"
    fake = FakeTime()

    async def go():
        settings = config(URL_A, dead, max_retries=2, replica_cooldown_s=30)
        async with TeacherClient(
            settings, STUDENT, transports={URL_A: httpx.ASGITransport(app=replica_a.app)},
            sleep=fake.sleep, clock=fake.clock,
        ) as client:  # fmt: skip
            at_start = client.stats.by_replica[dead]
            results = [await client.score(sequences) for _ in range(3)]
            during = client.stats.by_replica[dead]
            fake.now += 31  # the cool-down is over: the dead replica is tried (and fails) again
            results += [await client.score(sequences) for _ in range(2)]
            return results, at_start, during, client.stats, client.replica_status()

    results, at_start, during, stats, status = replica_a.loop.run(go())
    assert at_start == 3  # the start-up check: one try and two retries
    assert during == at_start  # cooling down: no request went there
    assert stats.by_replica[dead] == at_start + 1 and stats.failovers == 1
    for result in results:
        assert_same_scores(result.sequences, want)
    assert [r["up"] for r in status] == [True, False]


def test_start_does_not_wait_for_a_replica_that_hangs(replica_a, reference, sequences):
    _, want = reference

    async def hang(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()  # accepts the request, never answers

    async def go():
        transports = {
            URL_A: httpx.ASGITransport(app=replica_a.app),
            URL_B: httpx.ASGITransport(app=hang),
        }
        settings = config(URL_A, URL_B, connect_timeout_s=0.3)
        async with TeacherClient(settings, STUDENT, transports=transports) as client:
            status = {r["url"]: r["up"] for r in client.replica_status()}
            return status, await client.score(sequences)

    started = time.monotonic()
    status, result = replica_a.loop.run(go())
    assert time.monotonic() - started < 5  # the grace after replica A answered, not 300 s
    assert status == {URL_A: True, URL_B: False}
    assert_same_scores(result.sequences, want)


def test_a_lost_registration_is_registered_again(replica_a, reference, sequences):
    student, want = reference

    async def go():
        async with TeacherClient(
            config(), STUDENT, transports=httpx.ASGITransport(app=replica_a.app)
        ) as client:
            assert replica_a.client is not None
            deleted = await replica_a.client.delete(f"/v1/tokenizers/{client.student_id}")
            assert deleted.status_code == 200
            return await client.score(sequences), client.stats

    result, stats = replica_a.loop.run(go())
    assert_same_scores(result.sequences, want)
    assert stats.reregistrations == 1
    assert replica_a.service.registry.get(student).name == STUDENT


def test_generate_matches_the_service(replica_a):
    prompts = ["HAMLET.\n", {"text": "To be, or not"}, "OPHELIA.\n"]

    async def go():
        assert replica_a.client is not None
        direct = await replica_a.client.post(
            "/v1/generate",
            json={
                "prompts": [
                    {"text": "HAMLET.\n"},
                    {"text": "To be, or not"},
                    {"text": "OPHELIA.\n"},
                ],
                "max_tokens": 5,
                "temperature": 0.0,
            },
        )
        async with TeacherClient(
            config(max_sequences_per_request=2),
            None,  # a client that only generates needs no student tokenizer
            transports=httpx.ASGITransport(app=replica_a.app),
        ) as client:
            return direct.json(), await client.generate(prompts, max_tokens=5, temperature=0.0)

    direct, result = replica_a.loop.run(go())
    assert result.requests == 2
    assert [c.ids for c in result.completions] == [c["ids"] for c in direct["completions"]]
    assert [c.text for c in result.completions] == [c["text"] for c in direct["completions"]]
    assert all(c.finish_reason in ("length", "stop") for c in result.completions)
    assert result.usage["teacher_completion_tokens"] == sum(len(c.ids) for c in result.completions)


# -- a real serve process, killed and restarted, through the blocking facade ----------------------


class Served:
    """``tokenbridge serve`` on a fixed port, restartable; logs go to a file, not a pipe."""

    def __init__(self, teacher: Path, tmp_path: Path) -> None:
        self.teacher = teacher
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = (tmp_path / "serve.log").open("ab")

    def start(self, data_dir: Path) -> subprocess.Popen:
        env = {**os.environ, "TOKENBRIDGE_CACHE": str(CACHE_DIR), "TOKENBRIDGE_API_KEYS": "k-9"}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tokenbridge", "serve", "--teacher", str(self.teacher),
                "--port", str(self.port), "--data-dir", str(data_dir),
                "--max-top-k", str(MAX_TOP_K),
            ],
            cwd=REPO, env=env, stdout=self.log, stderr=self.log,
        )  # fmt: skip
        return self.process

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def close(self) -> None:
        self.kill()
        self.log.close()


@pytest.mark.process
def test_serve_process_killed_and_restarted_under_the_sync_client(
    teacher_dir, tmp_path, reference, sequences
):
    student, want = reference
    served = Served(teacher_dir, tmp_path)
    # Retries enough to outlast a restart on a loaded machine: with three other CPU-heavy jobs
    # on two cores a `serve` process took more than 80 tries (about 40 s) to come back.
    settings = TeacherClientConfig(
        urls=(served.url,), api_key="k-9", top_k=8, connect_timeout_s=2.0, timeout_s=60.0,
        max_retries=600, backoff_base_s=0.05, backoff_max_s=0.4, replica_cooldown_s=1.0,
    )  # fmt: skip
    try:
        wait_ready(
            served.url, served.start(tmp_path / "data"), headers={"authorization": "Bearer k-9"}
        )
        with SyncTeacherClient(settings, STUDENT) as client:
            assert client.student_id == student  # ids are content hashes: the same everywhere
            first = client.score(sequences)
            assert_same_scores(first.sequences, want)
            assert client.info()["max_top_k"] == MAX_TOP_K

            # Killed mid-run; restarted on the same port and data dir. The next call is made
            # while the new process is still loading: connections are refused, then it answers.
            served.kill()
            served.start(tmp_path / "data")
            again = client.score(sequences)
            assert_same_scores(again.sequences, want)
            stats = client.stats
            assert stats.retries >= 1 and stats.reregistrations == 0  # the data dir kept it

            # Restarted with a fresh data dir: the student is registered again, automatically.
            served.kill()
            served.start(tmp_path / "fresh")
            fresh = client.score(sequences)
            assert_same_scores(fresh.sequences, want)
            assert client.stats.reregistrations == 1
            assert client.generate(["HAMLET.\n"], max_tokens=3, temperature=0.0).completions
    finally:
        served.close()
    logs = (tmp_path / "serve.log").read_text()
    assert '"route": "/v1/score"' in logs and "k-9" not in logs
