"""An engine that fails (out of memory, or dead) is restarted by the service, in-process.

The engine is the real transformers engine on a tiny GPT-2 teacher; ``OutOfMemoryEngine`` only
adds a forward hook that raises ``torch.OutOfMemoryError`` from inside the model's forward pass,
where a real one comes from, so the engine's own handling has to notice it. Readiness is 503
(``restarting``) while the engine is brought back, 200 once it serves again; when the restarts
are spent the service is ``failed`` for good and says so on readiness and liveness.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest
import torch

from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.transformers import is_out_of_memory

from tests.support.service import (
    GatedEngine,
    OutOfMemoryEngine,
    config_for,
    running_app,
    transformers_engine,
)

pytestmark = pytest.mark.fault

JSON = {"accept": "application/json"}
PROMPT = "HAMLET.\n"
WAIT_S = 30.0  # upper bound for a restart of the tiny teacher


class MortalEngine(GatedEngine):
    """Plays an engine whose process dies while idle (vLLM's engine core can): clear
    ``healthy_flag`` to kill it; a restart brings it back."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.gate.set()
        self.starts = 0

    async def start(self) -> None:
        await super().start()
        self.healthy_flag = True
        self.starts += 1


async def register(client: Any) -> str:
    response = await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def score_body(student: str) -> dict[str, Any]:
    ids = [464, 2068, 7586, 21831, 11, 352, 1238, 22514, 13]
    return {
        "student_tokenizer": student,
        "top_k": 4,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
    }


async def until_ready(client: Any) -> float:
    """Poll ``/readyz`` until 200; return the seconds it took (fails after ``WAIT_S``)."""
    started = time.monotonic()
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() - started < WAIT_S, "the engine did not come back"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_config_rejects_negative_restarts_and_bad_backoff():
    with pytest.raises(ValueError, match="engine_restarts must be >= 0"):
        ServiceConfig(teacher="t", engine_restarts=-1)
    with pytest.raises(ValueError, match="engine_restart_backoff_s must lie in"):
        ServiceConfig(teacher="t", engine_restart_backoff_s=-0.5)
    config = ServiceConfig(teacher="t", engine_restarts=0, engine_restart_backoff_s=0)
    assert (config.engine_restarts, config.engine_restart_backoff_s) == (0, 0)


def test_out_of_memory_is_recognised_on_gpu_and_cpu():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    # What torch's CPU allocator raises when the process may not grow.
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
        )
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_out_of_memory_restarts_the_engine_and_it_serves_again(teacher_dir, tmp_path, loop):
    engine = OutOfMemoryEngine(teacher_dir)
    # A backoff long enough to look at the service while it restarts.
    config = config_for(teacher_dir, tmp_path, engine_restarts=2, engine_restart_backoff_s=0.5)
    generate = {"prompts": [{"text": PROMPT}], "max_tokens": 4, "seed": 1}
    with running_app(config, engine=engine, loop=loop) as harness:
        service = harness.service

        async def go(client):
            student = await register(client)
            body = score_body(student)
            before = await client.post("/v1/score", json=body, headers=JSON)
            engine.oom_next = 1
            failed = await client.post("/v1/score", json=body, headers=JSON)
            during = {
                "ready": await client.get("/readyz"),
                "health": await client.get("/healthz"),
                "score": await client.post("/v1/score", json=body, headers=JSON),
            }
            back_in = await until_ready(client)
            after = await client.post("/v1/score", json=body, headers=JSON)
            # Out of memory while generating: the same path.
            engine.oom_next = 1
            generate_failed = await client.post("/v1/generate", json=generate, headers=JSON)
            await until_ready(client)
            generated = await client.post("/v1/generate", json=generate, headers=JSON)
            listed = await client.get("/v1/tokenizers", headers=JSON)
            return (
                before,
                failed,
                during,
                back_in,
                after,
                generate_failed,
                generated,
                listed,
                student,
            )

        before, failed, during, back_in, after, generate_failed, generated, listed, student = (
            harness.run(go)
        )
        restarts = service.engine_restarts
    assert before.status_code == 200
    # The request that ran out of memory: 503, retry shortly.
    assert failed.status_code == 503 and "retry-after" in failed.headers
    assert failed.json()["error"]["code"] == "engine_unavailable"
    # While the engine restarts: not ready (503 with Retry-After), alive, work refused.
    assert during["ready"].status_code == 503 and "retry-after" in during["ready"].headers
    assert during["ready"].json() == {
        "ready": False,
        "state": "restarting",
        "teachers": {"default": {"ready": False, "state": "restarting"}},
        "unready": ["default"],
    }
    assert during["health"].status_code == 200 and during["health"].json()["state"] == "restarting"
    assert during["score"].status_code == 503 and "retry-after" in during["score"].headers
    assert back_in < WAIT_S
    # A working engine again, with the same weights: the same numbers as before.
    assert after.status_code == 200
    assert after.json()["sequences"] == before.json()["sequences"]
    assert generate_failed.status_code == 503
    assert generated.status_code == 200 and generated.json()["completions"][0]["ids"]
    assert engine.loads == 3 and restarts == 2  # loaded once, then restarted twice
    # The registry lives in the service, not the engine: untouched by restarts.
    assert [s["id"] for s in listed.json()["tokenizers"]] == [student]


def test_restarts_that_cannot_load_the_teacher_leave_the_service_failed_for_good(
    teacher_dir, tmp_path, loop
):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    engine = OutOfMemoryEngine(teacher)
    config = config_for(
        teacher, tmp_path / "data", engine_restarts=2, engine_restart_backoff_s=0.05
    )
    gave_up: list[str] = []
    with running_app(config, engine=engine, loop=loop) as harness:
        service = harness.service
        service.on_failed = lambda: gave_up.append(service.state)

        async def go(client):
            body = score_body(await register(client))
            # The weights vanish from disk: no restart can load the teacher again.
            (teacher / "model.safetensors").unlink()
            engine.oom_next = 1
            started = time.monotonic()
            failed = await client.post("/v1/score", json=body, headers=JSON)
            # Wait for the word to whoever runs us, not the state: the service turns
            # ``failed`` at once, but tells ``on_failed`` only after it stopped the engine.
            while not gave_up:
                assert time.monotonic() - started < WAIT_S, service.state
                await asyncio.sleep(0.02)
            gave_up_after = time.monotonic() - started
            return (
                failed,
                gave_up_after,
                await client.get("/readyz"),
                await client.get("/healthz"),
                await client.post("/v1/score", json=body, headers=JSON),
            )

        failed, gave_up_after, ready, health, refused = harness.run(go)
    assert failed.status_code == 503
    assert gave_up_after < WAIT_S
    assert engine.loads == 1 + 2  # the first load, then two restarts that failed to load
    assert gave_up == ["failed"]  # told once, so that `serve` can exit
    assert ready.status_code == 503 and ready.json()["state"] == "failed"
    assert ready.json()["unready"] == ["default"]
    assert health.status_code == 503 and health.json() == {"status": "failed", "state": "failed"}
    assert refused.status_code == 503
    assert service.state == "failed"  # stopping the app keeps the final state


def test_an_engine_that_dies_idle_is_noticed_and_restarted_without_any_request(
    teacher_dir, tmp_path, loop
):
    engine = MortalEngine(transformers_engine(teacher_dir))
    config = config_for(teacher_dir, tmp_path, engine_restarts=1, engine_restart_backoff_s=0)
    with running_app(config, engine=engine, loop=loop) as harness:
        service = harness.service

        async def go(client):
            engine.healthy_flag = False  # dies; nobody asks
            started = time.monotonic()
            seen = set()
            while not (engine.starts == 2 and service.state == "ready"):
                seen.add(service.state)
                assert time.monotonic() - started < WAIT_S, service.state
                await asyncio.sleep(0.01)
            return seen, await client.get("/readyz")

        seen, ready = harness.run(go)
    assert "restarting" in seen  # the watchdog noticed (no request was made until now)
    assert ready.status_code == 200 and service.engine_restarts == 1
