"""A teacher's ``devices`` reach its engine: vLLM's workers see only its GPUs while they are
built (``CUDA_VISIBLE_DEVICES``, restored after), the transformers engine runs on ``cuda:N``."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, ClassVar

import pytest

from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines import build_engine
from tokenbridge.service.engines.base import DEVICES_LOCK
from tokenbridge.service.engines.vllm import VLLMEngine, _visible_devices

from tests.support.service import tiny_teacher


@pytest.fixture
def no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("before", [None, "0,1,2,3"])
def test_visible_devices_are_set_while_building_then_restored(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    with _visible_devices((2, 3)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
        assert DEVICES_LOCK.locked()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    assert not DEVICES_LOCK.locked()
    with _visible_devices(None):  # no devices: the process's own, and no lock taken
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
        assert not DEVICES_LOCK.locked()


class _RecordingEngineType:
    """Stands in for vLLM's ``AsyncLLM`` class: records what its workers would have seen."""

    seen: ClassVar[list[str | None]] = []

    @classmethod
    def from_engine_args(cls, args: Any) -> str:
        cls.seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        time.sleep(0.05)  # long enough for a concurrent build to interleave if it could
        cls.seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return f"engine on {args}"


def test_two_teachers_building_at_once_each_see_only_their_own_gpus(no_visible_devices):
    engines = []
    for devices in ((0,), (1, 2)):
        engine = object.__new__(VLLMEngine)  # only ``devices`` matters to ``_build``
        engine.devices = devices
        engines.append(engine)
    _RecordingEngineType.seen = []
    threads = [
        threading.Thread(target=e._build, args=(_RecordingEngineType, "args")) for e in engines
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seen = _RecordingEngineType.seen
    # Each build saw one value from start to end: the builds never overlapped.
    assert sorted(zip(seen[::2], seen[1::2], strict=True)) == [("0", "0"), ("1,2", "1,2")]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_transformers_teacher_given_one_gpu_runs_on_it():
    teacher = str(tiny_teacher("gpt2"))
    config = ServiceConfig(teacher=teacher, devices=(1,)).teacher_configs()["default"]
    engine = build_engine(config)  # nothing touches a GPU before ``start``
    assert engine.device == "cuda:1" and engine.info.device == "cuda:1"
    on_cpu = ServiceConfig(teacher=teacher).teacher_configs()["default"]
    assert build_engine(on_cpu).device == "cpu"
