"""A ``tokenbridge serve`` process that really runs out of memory: it restarts its engine and
serves again; when the engine cannot come back, the process exits non-zero, promptly, saying why.

Nothing is faked. Once the service is up, the test caps the process's data segment
(``RLIMIT_DATA``, set from outside with ``prlimit``) a little above what it uses, then sends a
request whose forward pass needs ~1.5 GB of logits: torch's allocator fails inside the forward
pass, as on a full machine. The first time, the restarted engine loads and serves; the second
time the teacher's weights have been deleted from disk, so no restart can load them.
"""

from __future__ import annotations

import resource
import shutil
import time
from typing import Any

import httpx
import pytest

from tokenbridge.cli import SERVE_ENGINE_FAILED

from tests.support.service import data_segment, serve_process, tiny_teacher

pytestmark = [pytest.mark.fault, pytest.mark.process]

JSON = {"accept": "application/json"}
MARGIN = 256 << 20  # bytes the capped process may still grow by: plenty, but not 1.5 GB


def until_ready(http: httpx.Client, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (ready := http.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.05)
    return dict(ready.json())


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_out_of_memory_restarts_the_engine_then_exhaustion_exits_non_zero(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher("gpt2"), teacher)
    args = [
        "--teacher", str(teacher), "--data-dir", str(tmp_path / "data"), "--max-top-k", "8",
        "--engine-restarts", "2", "--engine-restart-backoff-s", "0.2",
    ]  # fmt: skip
    with (
        serve_process(args, tmp_path) as (url, process, log_path),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        student = http.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"}).json()["id"]
        small = {
            "student_tokenizer": student,
            "top_k": 4,
            "sequences": [{"prompt": {"text": "HAMLET.\n"}, "completion_ids": [464, 2068, 7586]}],
        }
        # Eight sequences of 900 tokens: one forward pass, 8 x 900 x 50257 float32 logits.
        huge = {
            **small,
            "sequences": [{"prompt": {"text": "a"}, "completion_ids": [262] * 900}] * 8,
        }
        baseline = http.post("/v1/score", json=small, headers=JSON)
        assert baseline.status_code == 200

        _, hard = resource.prlimit(process.pid, resource.RLIMIT_DATA)
        resource.prlimit(
            process.pid, resource.RLIMIT_DATA, (data_segment(process.pid) + MARGIN, hard)
        )
        out_of_memory = http.post("/v1/score", json=huge, headers=JSON)
        assert out_of_memory.status_code == 503, out_of_memory.text
        assert out_of_memory.json()["error"]["code"] == "engine_unavailable"
        # Restarted (a fresh engine fits under the cap): ready again, and the same numbers.
        ready = until_ready(http)
        assert ready["ready"] is True and ready["state"] == "ready" and ready["unready"] == []
        again = http.post("/v1/score", json=small, headers=JSON)
        assert again.status_code == 200
        assert again.json()["sequences"] == baseline.json()["sequences"]

        # Now the weights are gone: the next out-of-memory cannot be recovered from.
        (teacher / "model.safetensors").unlink()
        started = time.monotonic()
        assert http.post("/v1/score", json=huge, headers=JSON).status_code == 503
        status = process.wait(60)
        exited_after = time.monotonic() - started
    assert status == SERVE_ENGINE_FAILED
    assert exited_after < 30  # two restarts, 0.2 s and 0.4 s apart, then a graceful exit
    log = log_path.read_text()
    assert "can't allocate memory" in log  # a real out-of-memory, from torch's allocator
    assert "the engine is back after restart 1" in log
    assert "restart 2 could not start the engine" in log
    assert "2 restarts in a row did not bring it back" in log
    assert f"exiting with status {SERVE_ENGINE_FAILED}" in log
