"""``tokenbridge serve`` as a real uvicorn process: config file plus flags, msgpack over loopback,
readiness, and a graceful shutdown on SIGTERM that finishes the request in flight."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.paths import REPO
from tests.support.service import serve_process, tiny_teacher

pytestmark = [pytest.mark.e2e, pytest.mark.process]

MSGPACK = {"content-type": "application/msgpack", "authorization": "Bearer k-123"}


@pytest.fixture
def served(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(
        f'teacher = "{tiny_teacher("gpt2")}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "max_top_k = 16\n"
        "port = 1\n"  # overridden by the --port flag: flags win over the file
    )
    keys = {"TOKENBRIDGE_API_KEYS": "k-123"}
    with serve_process(["--config", str(config)], tmp_path, env=keys, headers=MSGPACK) as served:
        yield served


def test_serve_process_scores_over_loopback_and_drains_on_sigterm(served, bank):
    url, process, log_path = served
    with httpx.Client(base_url=url, timeout=60) as client:
        info = unpack(client.get("/v1/info", headers=MSGPACK).content)
        assert info["max_top_k"] == 16 and info["teacher"]["backend"] == "transformers"
        assert client.get("/v1/info").status_code == 401
        registered = client.post(
            "/v1/tokenizers", content=pack({"name": "llama3", "hub": "llama3"}), headers=MSGPACK
        )
        assert registered.status_code == 201
        student = unpack(registered.content)["id"]
        ids = encode_continuation(
            bank.tokenizer("llama3"), bank.vocab("llama3"), "Good night, sweet prince 1601."
        )
        body = {
            "student_tokenizer": student,
            "top_k": 8,
            "sequences": [{"prompt": {"text": "HORATIO.\n"}, "completion_ids": ids}] * 4,
        }
        response = client.post("/v1/score", content=pack(body), headers=MSGPACK)
        assert response.status_code == 200
        assert response.headers["x-request-id"]
        decoded = unpack(response.content)
        rows = [ScoredSequence.from_wire(s, decoded["top_k"]) for s in decoded["sequences"]]
        assert all(len(r.logprobs_S) == len(ids) and np.isfinite(r.logprobs_S).all() for r in rows)
        np.testing.assert_array_equal(rows[0].logprobs_S, rows[3].logprobs_S)

        # SIGTERM while a request is in flight: it is answered, then the process exits cleanly.
        results: list[int] = []
        big = {**body, "sequences": body["sequences"] * 16}
        worker = threading.Thread(
            target=lambda: results.append(
                client.post("/v1/score", content=pack(big), headers=MSGPACK).status_code
            )
        )
        worker.start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        worker.join(60)
    assert results == [200]
    # uvicorn re-raises the signal once it has shut down gracefully: -SIGTERM is a clean exit.
    assert process.wait(60) in (0, -signal.SIGTERM)
    logs = log_path.read_text()
    assert '"message": "stopped"' in logs  # the lifespan drained and stopped the engine
    assert '"message": "request"' in logs and '"route": "/v1/score"' in logs
    assert "k-123" not in logs


def test_serve_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('teacher = "x"\nbackend = "tensorflow"\n')
    result = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "backend must be one of" in result.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('teacher = "x"\ncolour = "red"\n')
    result = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "serve", "--config", str(unknown)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown keys ['colour']" in result.stderr
