"""A full admission limit over real HTTP: a ``tokenbridge serve`` process and concurrent clients.

The service admits at most ``max_tokens_in_flight`` teacher tokens, and every request here needs
more than half of them, so only one is served at a time. A long ``batch_wait_s`` keeps an admitted
request in the batcher for a while (the engine waits for its batch to fill), which gives the
other callers a window in which they must be refused, at once, with 429 and ``Retry-After``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig

from tests.support.service import serve_process, tiny_teacher

pytestmark = [pytest.mark.fault, pytest.mark.process]

LIMIT = 40  # max_tokens_in_flight, and max_request_tokens
BATCH_WAIT_S = 2.0
JSON = {"accept": "application/json"}
TEXT = " To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def metric(client: httpx.Client, name: str) -> float:
    """``name``'s value summed over its label sets (the one teacher's, here)."""
    total = 0.0  # a counter never incremented is not listed yet
    for line in client.get("/metrics").text.splitlines():
        if line.split("{")[0].split(" ")[0] == name:
            total += float(line.split()[-1])
    return total


def test_a_full_admission_limit_refuses_with_retry_after_then_serves_everyone(tmp_path, bank):
    args = [
        "--teacher", str(tiny_teacher("gpt2")), "--data-dir", str(tmp_path / "data"),
        "--max-top-k", "16", "--max-tokens-in-flight", str(LIMIT),
        "--max-request-tokens", str(LIMIT), "--batch-wait-s", str(BATCH_WAIT_S),
        "--admission-wait-s", "0",  # refuse at once: no line to wait in
    ]  # fmt: skip
    ids = bank.tokenizer("gpt2").encode(TEXT)
    sequence = {"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids}
    with (
        serve_process(args, tmp_path) as (url, _, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        student = http.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"}).json()["id"]
        body = {"student_tokenizer": student, "top_k": 4, "sequences": [sequence]}
        first = http.post("/v1/score", json=body, headers=JSON)
        assert first.status_code == 200, first.text
        tokens = first.json()["usage"]["teacher_tokens"]
        assert LIMIT / 2 < tokens <= LIMIT  # two such requests never fit together

        # One request is admitted and held in the batcher; everyone else is refused at once.
        holder_out: list[httpx.Response] = []
        holder = threading.Thread(
            target=lambda: holder_out.append(http.post("/v1/score", json=body, headers=JSON))
        )
        holder.start()
        deadline = time.monotonic() + 10
        while metric(http, "tokenbridge_tokens_in_flight") != tokens:
            assert time.monotonic() < deadline, "the holder was never admitted"
            time.sleep(0.01)

        def refused_call(_: int) -> tuple[httpx.Response, float]:
            with httpx.Client(base_url=url, timeout=60) as own:
                started = time.monotonic()
                response = own.post("/v1/score", json=body, headers=JSON)
                return response, time.monotonic() - started

        with ThreadPoolExecutor(5) as pool:
            refused = list(pool.map(refused_call, range(5)))
        holder.join(30)
        assert holder_out[0].status_code == 200
        for response, seconds in refused:
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert "max_tokens_in_flight" in response.json()["error"]["message"]
            assert seconds < BATCH_WAIT_S  # refused at once, never queued
        assert metric(http, "tokenbridge_rejected_total") == 5
        assert metric(http, "tokenbridge_tokens_in_flight") == 0

        # Real clients at once: refused ones wait for Retry-After and come back; all are served.
        config = TeacherClientConfig(
            urls=(url,), top_k=4, max_retries=40, backoff_base_s=0.05, backoff_max_s=1.0
        )
        clients = [SyncTeacherClient(config, "gpt2") for _ in range(3)]
        try:
            for client in clients:
                client.start()

            def score(client: SyncTeacherClient) -> Any:
                return client.score([sequence])

            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(score, clients))
            retries = sum(client.stats.retries for client in clients)
        finally:
            for client in clients:
                client.close()
        assert all(len(result.sequences) == 1 for result in results)
        assert retries >= 2  # at least two of the three had to wait their turn
        # Every refusal the clients saw was counted by the service, and nothing is left in flight.
        assert metric(http, "tokenbridge_rejected_total") == 5 + retries
        assert metric(http, "tokenbridge_tokens_in_flight") == 0
