"""``SyncTeacherClient``: ``TeacherClient`` with blocking methods, on an event loop of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from tokenbridge.client.teacher.client import TeacherClient
from tokenbridge.client.teacher.config import (
    ClientStats,
    GenerateResult,
    ScoreResult,
    TeacherClientConfig,
)

T = TypeVar("T")


class SyncTeacherClient:
    """``TeacherClient`` with blocking methods, for notebooks and scripts without asyncio.

    It runs its own event loop in a daemon thread, so it works where a loop is already running
    (Jupyter). ``with SyncTeacherClient(config, student_tokenizer=...) as client:``; arguments are
    those of ``TeacherClient``.
    """

    def __init__(
        self, config: TeacherClientConfig, student_tokenizer: Any = None, **options: Any
    ) -> None:
        self._client = TeacherClient(config, student_tokenizer, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenbridge-teacher-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coro.close()  # never awaited: close it so Python does not warn about it
            raise RuntimeError("the teacher client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coro)
        try:
            return future.result()
        except KeyboardInterrupt:
            # An interrupted cell should not leave the request running in the background.
            future.cancel()
            raise

    def __enter__(self) -> SyncTeacherClient:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """``TeacherClient.start``, blocking."""
        self._run(self._client.start())

    def close(self) -> None:
        """Close the connections and stop the background loop (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self._shutdown())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _shutdown(self) -> None:
        # Calls submitted and then abandoned must finish unwinding on this loop, not later in
        # garbage collection after the loop is closed.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._client.aclose()

    @property
    def client(self) -> TeacherClient:
        """The async client underneath (its properties are safe to read)."""
        return self._client

    @property
    def student_id(self) -> str | None:
        """See ``TeacherClient.student_id``."""
        return self._client.student_id

    @property
    def teacher_info(self) -> dict[str, Any]:
        """See ``TeacherClient.teacher_info``."""
        return self._client.teacher_info

    @property
    def teacher_name(self) -> str | None:
        """See ``TeacherClient.teacher_name``."""
        return self._client.teacher_name

    @property
    def stats(self) -> ClientStats:
        """See ``TeacherClient.stats``."""
        return self._client.stats

    def replica_status(self) -> list[dict[str, Any]]:
        """See ``TeacherClient.replica_status``."""
        return self._client.replica_status()

    def info(self) -> dict[str, Any]:
        """``TeacherClient.info``, blocking."""
        return self._run(self._client.info())

    def score(self, sequences: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """``TeacherClient.score``, blocking."""
        return self._run(self._client.score(sequences))

    def submit_score(self, sequences: Sequence[Mapping[str, Any]]) -> Future[ScoreResult]:
        """``TeacherClient.score`` started in the background: the caller keeps working (a
        trainer samples and trains meanwhile) and collects the result from the future."""
        return self._submit(self._client.score(sequences))

    def submit_generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Future[GenerateResult]:
        """``TeacherClient.generate`` started in the background (see ``submit_score``)."""
        return self._submit(self._client.generate(prompts, max_tokens, temperature, top_p, seed))

    def generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> GenerateResult:
        """``TeacherClient.generate``, blocking."""
        return self._run(self._client.generate(prompts, max_tokens, temperature, top_p, seed))
