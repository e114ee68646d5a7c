"""The service on vLLM whose engine core process is killed: it builds a new engine and serves the
same numbers again (vllm-cpu here; run in ``.venv-vllm``, ``make test-vllm``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from tests.support.service import config_for, running_app

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytestmark = [pytest.mark.fault, pytest.mark.vllm, pytest.mark.slow]

JSON = {"accept": "application/json"}


def kill_engine_cores() -> int:
    """SIGKILL the vLLM engine core processes this test process started; return how many."""
    import psutil

    killed = 0
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
                proc.kill()
                killed += 1
    return killed


def test_a_killed_vllm_engine_core_is_restarted_and_serves_again(teacher_dir, tmp_path, loop):
    from tokenbridge.service.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(teacher_dir), dtype="float32", max_model_len=512, max_top_k=8)
    config = config_for(
        teacher_dir, tmp_path, backend="vllm", max_top_k=8, max_model_len=512,
        engine_restarts=1, engine_restart_backoff_s=0,
    )  # fmt: skip
    with running_app(config, engine=engine, loop=loop) as harness:
        service = harness.service

        async def go(client):
            registered = await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
            body = {
                "student_tokenizer": registered.json()["id"],
                "top_k": 4,
                "sequences": [{"prompt": {"text": "HAMLET.\n"}, "completion_ids": [464, 2068]}],
            }
            before = await client.post("/v1/score", json=body, headers=JSON)
            if not kill_engine_cores():
                pytest.skip("cannot identify vLLM's engine core process")
            seen = set()
            started = time.monotonic()
            while not (service.engine_restarts == 1 and service.state == "ready"):
                seen.add(service.state)
                assert time.monotonic() - started < 300, service.state
                await asyncio.sleep(0.1)
            return before, seen, await client.post("/v1/score", json=body, headers=JSON)

        before, seen, after = harness.run(go)
    assert before.status_code == 200
    assert "restarting" in seen  # noticed with no request in flight (the watchdog)
    assert after.status_code == 200
    assert after.json()["sequences"] == before.json()["sequences"]
