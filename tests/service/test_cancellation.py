"""Callers that leave mid-flight, over real HTTP: the work is abandoned and nothing leaks.

The app runs under a real uvicorn server (in a background event loop, so the test can look inside:
admission, the batcher's queue, the loop's tasks) on a loopback port. The engine is the real
transformers engine whose forward passes wait on the worker thread until the test releases them
(``HeldEngine``): work the engine holds. A client sends a request over a raw socket and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tokenbridge.service.app import create_app
from tokenbridge.service.batching import MicroBatcher
from tokenbridge.service.engines.base import PositionScores, ScoreJob
from tokenbridge.service.engines.transformers import TransformersEngine

from tests.support.service import LoopThread, config_for, free_port, offline_loader

pytestmark = pytest.mark.fault

WAIT_S = 10.0  # upper bound for anything that should happen promptly
PROMPT = "HAMLET.\n"


class HeldEngine(TransformersEngine):
    """The real engine; each forward pass waits on the worker thread until ``release`` is set,
    and the lengths of the jobs that reached a forward pass are recorded."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(str(model_dir), max_top_k=16, batch_wait_s=0.0)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.forwarded: list[list[int]] = []

    def score_batch(self, jobs: Sequence[ScoreJob]) -> list[PositionScores]:
        self.forwarded.append([len(job.ids) for job in jobs])
        self.entered.set()
        if not self.release.wait(60):
            raise RuntimeError("the test never released the forward pass")
        return super().score_batch(jobs)


class Served:
    """A started app under uvicorn on a loopback port, and ways to look inside it."""

    def __init__(self, loop: LoopThread, app: Any, engine: HeldEngine, url: str) -> None:
        self.loop = loop
        self.app = app
        self.engine = engine
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.http = httpx.Client(base_url=url, timeout=60)
        self.student = ""  # the registered student's id
        self.baseline: list[str] = []  # the tasks pending on an idle server

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def batcher(self) -> MicroBatcher[ScoreJob, PositionScores]:
        return self.engine.batcher

    def tasks(self) -> list[str]:
        """Names of the tasks pending on the server's loop (this look excluded)."""

        async def look() -> list[str]:
            me = asyncio.current_task()
            return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)

        return self.loop.run(look())

    def gauge(self, name: str) -> float:
        """A metric's value from ``GET /metrics`` (the one teacher's)."""
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + '{teacher="default"} '):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")


@contextlib.contextmanager
def served_app(teacher_dir: Path, data_dir: Path) -> Iterator[Served]:
    loop = LoopThread()
    engine = HeldEngine(teacher_dir)
    app = create_app(
        config_for(teacher_dir, data_dir), engine=engine, tokenizer_loader=offline_loader
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    running = loop.submit(server.serve())
    deadline = time.monotonic() + 120
    while not server.started:
        if running.done():
            running.result()  # raises why it stopped
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    served = Served(loop, app, engine, f"http://127.0.0.1:{port}")
    try:
        yield served
    finally:
        engine.release.set()  # never leave the worker blocked
        served.http.close()
        server.should_exit = True
        running.result(60)
        loop.close()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def body(student: str, lengths: Sequence[int]) -> dict[str, Any]:
    """A score request with one sequence per length (distinct lengths tell jobs apart)."""
    return {
        "student_tokenizer": student,
        "top_k": 4,
        "sequences": [
            {"prompt": {"text": PROMPT}, "completion_ids": [464 + i for i in range(n)]}
            for n in lengths
        ],
    }


def send_and_keep_open(port: int, payload: dict[str, Any]) -> socket.socket:
    """POST ``/v1/score`` over a raw connection and return it, unread (the caller closes it)."""
    data = json.dumps(payload).encode()
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(head.encode() + data)
    return sock


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def served(teacher_dir, tmp_path):
    with served_app(teacher_dir, tmp_path / "data") as served:
        registered = served.http.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
        assert registered.status_code == 201, registered.text
        served.student = registered.json()["id"]
        # One request end to end first, so that what is pending afterwards is the baseline.
        served.engine.release.set()
        assert served.http.post("/v1/score", json=body(served.student, [3])).status_code == 200
        served.engine.release.clear()
        served.engine.entered.clear()
        served.engine.forwarded.clear()
        time.sleep(0.2)
        served.baseline = served.tasks()
        yield served


def assert_nothing_leaked(served: Served) -> None:
    until(lambda: served.service.admission.in_flight == 0, "admission to empty")
    assert served.gauge("tokenbridge_tokens_in_flight") == 0
    assert served.batcher.waiting == 0 and served.batcher.collecting == 0
    # The request tasks, their disconnect watchers and engine calls are gone: only the server,
    # its lifespan, the batcher loop and the engine watchdog remain, as before.
    until(lambda: served.tasks() == served.baseline, f"tasks {served.baseline}")
    assert served.http.get("/readyz").status_code == 200


def test_a_client_that_disconnects_has_its_queued_jobs_dropped_before_they_run(served):
    engine, batcher, admission = served.engine, served.batcher, served.service.admission
    held, held_out = in_background(
        lambda: served.http.post("/v1/score", json=body(served.student, [5]))
    )
    until(engine.entered.is_set, "the first request's forward pass")
    held_tokens = admission.in_flight
    # A second caller queues three jobs behind the held forward pass, then hangs up.
    leaver = send_and_keep_open(served.port, body(served.student, [7, 8, 9]))
    until(lambda: batcher.waiting == 3, "the leaver's three jobs in the queue")
    assert admission.in_flight > held_tokens
    leaver.close()
    # Its jobs leave the queue at once (the engine still holds the first forward pass), and its
    # admission is given back.
    until(lambda: batcher.waiting == 0, "the leaver's jobs to leave the queue")
    assert admission.in_flight == held_tokens
    assert served.gauge("tokenbridge_tokens_in_flight") == held_tokens
    assert batcher.jobs_dropped == 3
    engine.release.set()
    held.join(WAIT_S)
    assert held_out[0].status_code == 200
    # Only the first request's job ever reached a forward pass.
    prompt_tokens = len(engine.tokenizer.encode(PROMPT))
    assert engine.forwarded == [[prompt_tokens + 5]]
    assert_nothing_leaked(served)
    # The same request from a caller who waits is served in full.
    again = served.http.post("/v1/score", json=body(served.student, [7, 8, 9]))
    assert again.status_code == 200 and len(again.json()["sequences"]) == 3
    assert engine.forwarded[-1] == [prompt_tokens + n for n in (7, 8, 9)]


def test_a_client_that_leaves_during_the_forward_pass_gives_its_admission_back(served):
    engine, batcher, admission = served.engine, served.batcher, served.service.admission
    leaver = send_and_keep_open(served.port, body(served.student, [6, 6]))
    until(engine.entered.is_set, "the leaver's forward pass")
    assert admission.in_flight > 0
    leaver.close()
    # A forward pass cannot be recalled, but the request is abandoned at once: its admission
    # comes back while the worker still runs, and the service goes on answering.
    until(lambda: admission.in_flight == 0, "the leaver's admission to come back")
    assert served.gauge("tokenbridge_tokens_in_flight") == 0
    assert served.http.get("/readyz").status_code == 200
    assert batcher.waiting == 0
    engine.release.set()  # the pass finishes; its result is dropped
    until(lambda: batcher.batches_run >= 2, "the abandoned pass to finish")
    assert_nothing_leaked(served)
    served.http.post("/v1/score", json=body(served.student, [4])).raise_for_status()


def test_a_job_withdrawn_from_the_batch_being_collected_frees_its_share_of_the_budget():
    """A caller that leaves while its job waits in a batch still being collected takes the job
    and its cost out: the next caller fits in that batch, and the withdrawn job never runs."""
    batches: list[list[int]] = []

    def run_batch(jobs: Sequence[int]) -> list[int]:
        batches.append(list(jobs))
        return [job * 10 for job in jobs]

    async def scenario(batcher: MicroBatcher[int, int]) -> list[int]:
        first = asyncio.create_task(batcher.submit(4))
        doomed = asyncio.create_task(batcher.submit(5))
        while batcher.collecting < 2:  # both are in the batch being collected (4 + 5 of 10)
            await asyncio.sleep(0.001)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert batcher.collecting == 1 and batcher.jobs_dropped == 1
        later = asyncio.create_task(batcher.submit(6))  # 4 + 6 fits only without the 5
        return list(await asyncio.gather(first, later))

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            run_batch, lambda job: job, executor=executor, max_wait_s=0.5, max_batch_tokens=10
        )
        try:
            return await asyncio.wait_for(scenario(batcher), WAIT_S)
        finally:
            await batcher.close()

    with ThreadPoolExecutor(max_workers=1) as executor:
        results = asyncio.run(main())
    assert results == [40, 60]
    assert batches == [[4, 6]]  # one batch, without the job whose caller left
