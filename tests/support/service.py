"""Helpers for the service tests: tiny teachers, an app running in a background event loop, a
gated engine (a fake that wraps the real one and holds requests until released), direct forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from tokenbridge import process as process_helpers
from tokenbridge.hub import load_tokenizer
from tokenbridge.process import free_port
from tokenbridge.service.app import create_app
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.base import Generated, GenerateParams, PositionScores, ScoreJob
from tokenbridge.service.engines.transformers import TransformersEngine
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

from tests.support.paths import CACHE_DIR

T = TypeVar("T")

MODELS_DIR = CACHE_DIR / "models"


def tiny_teacher(tokenizer: str = "gpt2", architecture: str = "gpt2", **shape: int) -> Path:
    """A tiny random-init teacher over a real tokenizer, built once into the cache."""
    spec = TinyModelSpec(tokenizer, architecture, **shape)  # type: ignore[arg-type]
    name = f"tiny-{architecture}-{tokenizer}-h{spec.hidden}-l{spec.layers}-s{spec.seed}"
    return build_tiny_model(spec, MODELS_DIR / name, CACHE_DIR)


def offline_loader(name: str) -> Any:
    """The tokenizer loader the ``serve`` command passes: offline names, paths, hub names."""
    return load_tokenizer(name, CACHE_DIR)


def direct_logprobs(model_dir: Path, ids: list[int]) -> np.ndarray:
    """log-softmax of a plain transformers forward: row p predicts ``ids[p + 1]``."""
    import torch

    model = _model(str(model_dir))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def assert_matches_forward(
    seq: Any,
    bank: Any,
    student: str,
    teacher: str,
    model_dir: Path,
    prompt: str,
    text: str,
    atol: float = 2e-5,
) -> int:
    """A scored completion of ``text`` (student tokenizer ``student``) against a direct forward of
    the teacher at ``model_dir`` (tokenizer ``teacher``): the chunks (runs of tokens whose bytes
    end together on both sides) are where the bytes put them, each chunk's log-prob is the sum of
    its teacher tokens' log-probs, and at every 1:1 position (a chunk of one student and one
    teacher token) the student's log-prob is that teacher token's. Returns the 1:1 positions."""
    from tokenbridge.shared.align import encode_continuation

    student_ids = encode_continuation(bank.tokenizer(student), bank.vocab(student), text)
    teacher_ids = encode_continuation(bank.tokenizer(teacher), bank.vocab(teacher), text)
    prompt_ids = bank.tokenizer(teacher).encode(prompt)
    forward = direct_logprobs(model_dir, prompt_ids + teacher_ids)
    start = len(prompt_ids)
    path = forward[np.arange(start - 1, start - 1 + len(teacher_ids)), teacher_ids]
    student_bytes, teacher_bytes = bank.vocab(student).token_bytes, bank.vocab(teacher).token_bytes
    student_ends = np.cumsum([len(student_bytes[i]) for i in student_ids])
    teacher_ends = np.cumsum([len(teacher_bytes[i]) for i in teacher_ids])
    assert student_ends[-1] == teacher_ends[-1] == len(text.encode())
    boundaries = np.array(sorted(set(student_ends.tolist()) & set(teacher_ends.tolist())))
    student_chunk = np.searchsorted(boundaries, student_ends)
    teacher_chunk = np.searchsorted(boundaries, teacher_ends)
    np.testing.assert_array_equal(seq.chunk_ids_S, student_chunk)
    np.testing.assert_allclose(
        seq.chunk_logprobs_C, np.bincount(teacher_chunk, weights=path), rtol=0, atol=5 * atol
    )
    students_in, teachers_in = np.bincount(student_chunk), np.bincount(teacher_chunk)
    one_to_one = np.flatnonzero(
        (students_in[student_chunk] == 1) & (teachers_in[student_chunk] == 1)
    )
    teacher_index = np.searchsorted(teacher_chunk, student_chunk[one_to_one])
    np.testing.assert_allclose(seq.logprobs_S[one_to_one], path[teacher_index], rtol=0, atol=atol)
    # Over the whole completion the student's log-probs add up to the teacher's.
    assert abs(float(seq.logprobs_S.sum()) - float(path.sum())) <= 50 * atol
    return len(one_to_one)


_MODELS: dict[str, Any] = {}


def _model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    if path not in _MODELS:
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path).eval()
    return _MODELS[path]


class LoopThread:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Awaitable[T]) -> Future[T]:
        """Schedule ``coro``; return a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T], timeout: float = 300) -> T:
        """Run ``coro`` to completion on the loop."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class AppHarness:
    """A started app (lifespan entered) with an in-process httpx client, on a ``LoopThread``."""

    def __init__(self, loop: LoopThread, app: Any) -> None:
        self.loop = loop
        self.app = app
        self._lifespan: Any = None
        self.client: httpx.AsyncClient | None = None

    @property
    def service(self) -> Any:
        """The app's ``TeacherService``."""
        return self.app.state.service

    async def _start(self) -> None:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://service", timeout=120
        )

    async def _stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)

    def run(self, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """Run ``scenario(client)`` on the app's loop."""
        assert self.client is not None
        return self.loop.run(scenario(self.client))


@contextlib.contextmanager
def running_app(
    config: ServiceConfig,
    engine: Any = None,
    loop: LoopThread | None = None,
    tokenizer_loader: Callable[[str], Any] = offline_loader,
    engines: dict[str, Any] | None = None,
) -> Iterator[AppHarness]:
    """Build, start and finally stop an app for ``config`` (``engines``: some teachers' engines
    by name, the others built from the config)."""
    own_loop = loop is None
    loop = loop or LoopThread()
    app = create_app(config, engine=engine, tokenizer_loader=tokenizer_loader, engines=engines)
    harness = AppHarness(loop, app)
    loop.run(harness._start())
    try:
        yield harness
    finally:
        loop.run(harness._stop())
        if own_loop:
            loop.close()


def transformers_engine(model_dir: Path, **options: Any) -> TransformersEngine:
    """The embedded engine over ``model_dir`` with test-friendly defaults."""
    return TransformersEngine(str(model_dir), max_top_k=options.pop("max_top_k", 64), **options)


class OutOfMemoryEngine(TransformersEngine):
    """The real engine, whose model runs out of memory on demand: the next ``oom_next`` forward
    passes raise ``torch.OutOfMemoryError`` from inside the forward, and the engine's own
    handling marks itself unhealthy. Counts load attempts."""

    def __init__(self, model_dir: Path, max_top_k: int = 16, **options: Any) -> None:
        super().__init__(str(model_dir), max_top_k=max_top_k, **options)
        self.oom_next = 0
        self.loads = 0

    def load(self) -> None:
        self.loads += 1
        super().load()
        self._model.register_forward_pre_hook(self._maybe_run_out)

    def _maybe_run_out(self, module: Any, args: Any) -> None:
        import torch

        if self.oom_next > 0:
            self.oom_next -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")


def data_segment(pid: int) -> int:
    """``VmData`` of process ``pid`` in bytes: what ``RLIMIT_DATA`` is checked against."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmData in /proc/PID/status")


class GatedEngine:
    """A fake engine around a real one: ``score``/``generate`` wait until the gate opens.

    Lets tests hold requests in flight (admission, deadlines, cancellation) without timing luck.
    ``healthy_flag`` can be cleared to play an engine that died.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.gate = asyncio.Event()
        self.entered = 0
        self.healthy_flag = True

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def healthy(self) -> bool:
        return self.healthy_flag and self.inner.healthy()

    async def score(self, job: ScoreJob) -> PositionScores:
        self.entered += 1
        await self.gate.wait()
        return await self.inner.score(job)

    async def generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        await self.gate.wait()
        return await self.inner.generate(prompt_ids, params)


def config_for(teacher: Path, data_dir: Path, **overrides: Any) -> ServiceConfig:
    """A ``ServiceConfig`` for tests."""
    return ServiceConfig(teacher=str(teacher), data_dir=data_dir, **overrides)


def wait_ready(
    url: str, process: subprocess.Popen, timeout: float = 180, headers: dict | None = None
) -> None:
    """Poll ``/readyz`` until 200; fail if the process exits first."""
    try:
        process_helpers.wait_ready(url, process, timeout=timeout, headers=headers)
    except process_helpers.ServiceStartError as error:
        raise AssertionError(str(error)) from None


@contextlib.contextmanager
def serve_process(
    args: list[str],
    folder: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``tokenbridge serve ARGS --port P`` as a process, ready, with the tests' offline cache;
    yields (url, process, log path)."""
    from tests.support.paths import REPO

    full_env = {"TOKENBRIDGE_CACHE": str(CACHE_DIR), **(env or {})}
    with process_helpers.serve_process(
        args, folder, port=port, env=full_env, headers=headers, timeout=timeout, cwd=REPO
    ) as served:
        yield served


__all__ = [
    "AppHarness",
    "GatedEngine",
    "LoopThread",
    "assert_matches_forward",
    "config_for",
    "direct_logprobs",
    "free_port",
    "offline_loader",
    "running_app",
    "serve_process",
    "tiny_teacher",
    "transformers_engine",
    "wait_ready",
]
