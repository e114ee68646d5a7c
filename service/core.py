"""The teacher service itself, independent of HTTP: lifecycle, scoring, generation, registry.

``app`` wraps a ``TeacherService`` in routes; tests and benchmarks may drive it directly.
States: ``starting`` → ``ready`` → ``draining`` → ``stopped``. Only ``ready`` accepts work (503
otherwise).

When the engine fails (it died or ran out of memory; noticed by a request, a readiness probe or a
watchdog that looks every ``health_check_interval_s``) the service turns ``restarting``: it stops
the engine and starts it again after ``engine_restart_backoff_s`` (doubling each time in a row),
and is ``ready`` again once the engine is healthy. A request the engine serves resets the count;
after ``engine_restarts`` restarts in a row without one, the service is ``failed`` for good and
calls ``on_failed`` (``tokenbridge serve`` then exits non-zero, so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tokenbridge.service.admission import Admission
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.base import (
    FlopModel,
    GenerateParams,
    PositionScores,
    TeacherEngine,
)
from tokenbridge.service.errors import (
    EngineUnavailableError,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    UnprocessableError,
)
from tokenbridge.service.metrics import ServiceMetrics
from tokenbridge.service.registry import StudentEntry, StudentRegistry
from tokenbridge.service.scoring import (
    PreparedSequence,
    prepare,
    render_prompt,
    teacher_scores,
    wire_sequence,
)
from tokenbridge.shared.protocol import (
    API_VERSION,
    GenerateRequest,
    RegisterTokenizerRequest,
    ScoreRequest,
)

__all__ = ["TeacherService"]

logger = logging.getLogger("tokenbridge.service")

T = TypeVar("T")

#: The longest wait between two engine restarts, however many came before.
_MAX_RESTART_BACKOFF_S = 60.0


class TeacherService:
    """One teacher engine, its student registry, admission control and metrics."""

    #: Seconds between the watchdog's looks at the engine's health while the service is ready.
    health_check_interval_s = 0.5

    def __init__(
        self,
        config: ServiceConfig,
        engine: TeacherEngine,
        tokenizer_loader: Callable[[str], Any] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = ServiceMetrics()
        self.admission = Admission(
            config.max_tokens_in_flight, config.admission_wait_s, config.admission_queue
        )
        self.metrics.admission_waiting.set_function(lambda: self.admission.waiting)
        self.state = "starting"
        self._loader = tokenizer_loader
        self._registry: StudentRegistry | None = None
        self._tasks_in_flight = 0
        #: Called once when the engine failed and its restarts are spent (``serve`` exits then).
        self.on_failed: Callable[[], None] | None = None
        #: Restarts that brought the engine back since the service started.
        self.engine_restarts = 0
        self._restarts_in_a_row = 0
        self._recovery: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, load the registry; then accept work."""
        started = time.monotonic()
        await self.engine.start()
        kwargs = {"loader": self._loader} if self._loader is not None else {}
        registry = StudentRegistry(
            self.config.data_dir,
            self.engine.tokenizer,
            self.config.probe_text,
            tokenizer_dirs=self.config.tokenizer_dirs,
            **kwargs,
        )
        loaded = await asyncio.to_thread(registry.load_all)
        self._registry = registry
        self.state = "ready"
        self.metrics.ready.set(1)
        logger.info(
            "ready: teacher %s on %s, %d stored students, started in %.1f s",
            self.engine.info.model, self.engine.info.backend, loaded, time.monotonic() - started,
        )  # fmt: skip
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name="engine-watchdog"
        )

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, wait for requests in flight (bounded), stop the engine.

        A service that gave up on its engine stays ``failed``: the final state says why it ended.
        """
        if self._stopped:
            return
        self._stopped = True
        for task in (self._watchdog, self._recovery):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        failed = self.state == "failed"
        self.state = "failed" if failed else "draining"
        self.metrics.ready.set(0)
        deadline = time.monotonic() + drain_timeout_s
        while self._tasks_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.engine.stop()
        self.state = "failed" if failed else "stopped"
        logger.info("stopped")

    def readiness(self) -> tuple[bool, str]:
        """Whether work is accepted now, and the state's name (``restarting`` while a failed
        engine is being brought back, ``failed`` once the service gave up on it)."""
        if self.state == "ready" and not self.engine.healthy():
            self._engine_failed("the engine is no longer healthy (it died or ran out of memory)")
        return self.state == "ready", self.state

    # -- engine failures -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice an engine that dies while no request is there to see it."""
        while True:
            await asyncio.sleep(self.health_check_interval_s)
            try:
                self.readiness()
            except Exception:  # the watchdog must outlive a bad look at the engine
                logger.exception("the engine health check failed")

    def _engine_failed(self, reason: str) -> None:
        """Turn unready at once and start bringing the engine back (in a task of its own)."""
        if self.state != "ready":
            return
        self.metrics.ready.set(0)
        if self._restarts_in_a_row >= self.config.engine_restarts:
            self.state = "failed"  # no restart left: final at once
            recovery = self._give_up(reason)
        else:
            self.state = "restarting"
            logger.error("%s; readiness turns 503 while the service restarts it", reason)
            recovery = self._recover(reason)
        self._recovery = asyncio.get_running_loop().create_task(recovery, name="engine-recovery")

    async def _recover(self, reason: str) -> None:
        """Stop and start the engine, with backoff, until it is healthy or restarts are spent."""
        limit = self.config.engine_restarts
        while self._restarts_in_a_row < limit:
            self._restarts_in_a_row += 1
            attempt = self._restarts_in_a_row
            backoff = self.config.engine_restart_backoff_s
            delay = min(backoff * 2 ** (attempt - 1), max(backoff, _MAX_RESTART_BACKOFF_S))
            try:
                await self.engine.stop()
            except Exception as error:
                logger.warning("stopping the failed engine raised %r; starting it anyway", error)
            logger.warning(
                "restarting the engine in %.1f s (restart %d of at most %d in a row)",
                delay, attempt, limit,
            )  # fmt: skip
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                await self.engine.start()
            except Exception as error:
                reason = f"restart {attempt} could not start the engine: {error!r}"
                logger.error("%s", reason)
                continue
            if not self.engine.healthy():
                reason = f"restart {attempt} left the engine unhealthy"
                logger.error("%s", reason)
                continue
            self.engine_restarts += 1
            self.metrics.engine_restarts.inc()
            self.state = "ready"
            self.metrics.ready.set(1)
            logger.warning(
                "the engine is back after restart %d (started in %.1f s); ready again",
                attempt, time.monotonic() - started,
            )  # fmt: skip
            return
        await self._give_up(reason)

    async def _give_up(self, reason: str) -> None:
        """The engine is not coming back: ``failed`` for good, and tell whoever runs us."""
        self.state = "failed"
        self.metrics.ready.set(0)
        limit = self.config.engine_restarts
        tried = (
            f"{limit} restart{'s' if limit != 1 else ''} in a row did not bring it back"
            if limit
            else "engine restarts are off (engine_restarts = 0)"
        )
        logger.critical(
            "the teacher engine failed and %s (last: %s); giving up: the service is failed for "
            "good (readiness and liveness answer 503) and should be restarted",
            tried, reason,
        )  # fmt: skip
        with contextlib.suppress(Exception):
            await self.engine.stop()
        if self.on_failed is not None:
            self.on_failed()

    def _require_ready(self) -> StudentRegistry:
        ready, state = self.readiness()
        if not ready or self._registry is None:
            raise NotReadyError(f"the service is {state}; retry shortly")
        return self._registry

    @property
    def registry(self) -> StudentRegistry:
        """The student registry (``NotReadyError`` before the service has started)."""
        if self._registry is None:
            raise NotReadyError("the service is starting; retry shortly")
        return self._registry

    # -- description ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``."""
        engine = self.engine.info
        config = self.config
        teacher_vocab = self._registry.teacher if self._registry is not None else None
        return {
            "api_version": API_VERSION,
            "state": self.state,
            "teacher": {
                "model": engine.model,
                "revision": engine.revision,
                "backend": engine.backend,
                "dtype": engine.dtype,
                "device": engine.device,
                "versions": engine.versions,
                "vocab_size": engine.vocab_size,
                "tokenizer_size": teacher_vocab.size if teacher_vocab is not None else None,
                "vocab_hash": teacher_vocab.content_hash if teacher_vocab is not None else None,
                "has_chat_template": bool(getattr(self.engine.tokenizer, "chat_template", None)),
                "flops": _flops_info(engine.flop_model),
            },
            "max_top_k": min(config.max_top_k, engine.max_top_k),
            "limits": {
                "max_model_len": engine.max_model_len,
                "max_body_bytes": config.max_body_bytes,
                "max_sequences": config.max_sequences,
                "max_request_tokens": config.max_request_tokens,
                "max_tokens_in_flight": config.max_tokens_in_flight,
                "admission_wait_s": config.admission_wait_s,
                "admission_queue": config.admission_queue,
                "max_generate_tokens": config.max_generate_tokens,
                "request_timeout_s": config.request_timeout_s,
            },
            "logprobs": {
                "temperature": 1.0,
                "positions": "row j is about completion token j given the prompt and tokens < j",
            },
            "encodings": ["application/msgpack", "application/json"],
            "students": len(self._registry) if self._registry is not None else 0,
        }

    def _teacher_flops(self, lengths: list[int]) -> int | None:
        """FLOPs of running the teacher over sequences of ``lengths`` tokens (positions 0..L-1
        each), the same count for a scored sequence and a prompt plus its generated tokens;
        ``None`` when the engine has no FLOP model."""
        model = self.engine.info.flop_model
        if model is None:
            return None
        return sum(model.sequence_flops(length) for length in lengths)

    def _teacher_stamp(self) -> dict[str, Any]:
        engine = self.engine.info
        return {
            "model": engine.model,
            "backend": engine.backend,
            "dtype": engine.dtype,
            "versions": engine.versions,
        }

    # -- registry ------------------------------------------------------------------------------

    async def register(self, request: RegisterTokenizerRequest) -> tuple[StudentEntry, bool]:
        """Register a student tokenizer (tables are built off the event loop)."""
        registry = self._require_ready()
        return await asyncio.to_thread(registry.register, request)

    # -- scoring -------------------------------------------------------------------------------

    def _check_top_k(self, top_k: int) -> None:
        limit = min(self.config.max_top_k, self.engine.info.max_top_k)
        if top_k > limit:
            raise UnprocessableError(
                f"top_k {top_k} is above this service's maximum {limit} (max_top_k in "
                f"GET /v1/info); ask for top_k <= {limit}"
            )

    async def score(self, request: ScoreRequest) -> dict[str, Any]:
        """``POST /v1/score``: the mapped teacher signals of every sequence, in request order."""
        registry = self._require_ready()
        self._check_top_k(request.top_k)
        if len(request.sequences) > self.config.max_sequences:
            raise PayloadTooLargeError(
                f"{len(request.sequences)} sequences in one request; max_sequences is "
                f"{self.config.max_sequences}: split the batch"
            )
        student = registry.get(request.student_tokenizer)
        top_k = request.top_k
        self._tasks_in_flight += 1
        try:
            started = time.perf_counter()
            teacher_tokenizer = self.engine.tokenizer
            max_len = self.engine.info.max_model_len
            prepared = await asyncio.to_thread(
                lambda: [
                    prepare(s, student, teacher_tokenizer, top_k, max_len)
                    for s in request.sequences
                ]
            )
            tokens = sum(p.teacher_tokens for p in prepared)
            if tokens > self.config.max_request_tokens:
                raise PayloadTooLargeError(
                    f"the request needs {tokens} teacher tokens; max_request_tokens is "
                    f"{self.config.max_request_tokens}: split the batch"
                )
            prepared_at = time.perf_counter()
            try:
                async with self.admission.admit(tokens):
                    self.metrics.tokens_in_flight.set(self.admission.in_flight)
                    scored = await self._run_engine(prepared)
            finally:
                self.metrics.tokens_in_flight.set(self.admission.in_flight)
            engine_done = time.perf_counter()
            sequences = await asyncio.to_thread(self._map_all, prepared, scored, student, top_k)
            mapped_at = time.perf_counter()
        finally:
            self._tasks_in_flight -= 1
        positions = sum(len(p.student_ids) for p in prepared)
        prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
        self.metrics.scored_positions.inc(positions)
        self.metrics.teacher_tokens.labels("prompt").inc(prompt_tokens)
        self.metrics.teacher_tokens.labels("completion").inc(tokens - prompt_tokens)
        for stage, seconds in (
            ("prepare", prepared_at - started),
            ("engine", engine_done - prepared_at),
            ("mapping", mapped_at - engine_done),
        ):
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        return {
            "top_k": top_k,
            "sequences": sequences,
            "usage": {
                "positions": positions,
                "teacher_prompt_tokens": prompt_tokens,
                "teacher_completion_tokens": tokens - prompt_tokens,
                "teacher_tokens": tokens,
                "teacher_flops": self._teacher_flops([p.teacher_tokens for p in prepared]),
            },
            "timings": {
                "prepare_s": prepared_at - started,
                "engine_s": engine_done - prepared_at,
                "mapping_s": mapped_at - engine_done,
            },
            "teacher": self._teacher_stamp(),
        }

    async def _run_engine(self, prepared: list[PreparedSequence]) -> list[PositionScores | None]:
        async def one(item: PreparedSequence) -> PositionScores | None:
            return None if item.job is None else await self.engine.score(item.job)

        return await self._engine_call(asyncio.gather(*(one(p) for p in prepared)))

    async def _engine_call(self, work: Awaitable[list[T]]) -> list[T]:
        """Await engine ``work``; an engine that failed doing it turns the service unready (and
        restarting) and the caller gets 503. Success resets the count of restarts in a row."""
        try:
            results = list(await work)
        except ServiceError:
            raise
        except Exception as error:
            if not self.engine.healthy():
                self._engine_failed(f"the engine failed serving a request: {error!r}")
                raise EngineUnavailableError(
                    "the teacher engine failed (out of memory or died); "
                    + (
                        "the service gave up on it and must be restarted"
                        if self.state == "failed"
                        else "the service is restarting it: retry shortly"
                    )
                ) from error
            raise
        self._restarts_in_a_row = 0
        return results

    @staticmethod
    def _map_all(
        prepared: list[PreparedSequence],
        scored: list[PositionScores | None],
        student: StudentEntry,
        top_k: int,
    ) -> list[dict[str, Any]]:
        out = []
        for item, rows in zip(prepared, scored, strict=True):
            scores = teacher_scores(item, rows, top_k)
            mapped = student.mapper.map(
                item.student_ids, item.view.ids, item.alignment, scores, top_k,
                item.view.untiled_bytes,
            )  # fmt: skip
            out.append(wire_sequence(mapped, item, top_k))
        return out

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        """``POST /v1/generate``: one teacher sample per prompt, for the SFT baseline."""
        self._require_ready()
        max_tokens = (
            min(128, self.config.max_generate_tokens)
            if request.max_tokens is None
            else request.max_tokens
        )
        if max_tokens > self.config.max_generate_tokens:
            raise UnprocessableError(
                f"max_tokens {max_tokens} is above max_generate_tokens "
                f"{self.config.max_generate_tokens}"
            )
        if len(request.prompts) > self.config.max_sequences:
            raise PayloadTooLargeError(
                f"{len(request.prompts)} prompts; max_sequences is {self.config.max_sequences}"
            )
        tokenizer = self.engine.tokenizer
        prompts = [render_prompt(p, tokenizer, None) for p in request.prompts]
        max_len = self.engine.info.max_model_len
        for ids in prompts:
            if len(ids) + max_tokens > max_len:
                raise PayloadTooLargeError(
                    f"a prompt of {len(ids)} teacher tokens plus max_tokens {max_tokens} "
                    f"exceeds max_model_len {max_len}"
                )
        tokens = sum(len(p) + max_tokens for p in prompts)
        self._tasks_in_flight += 1
        try:
            async with self.admission.admit(tokens):
                results = await self._engine_call(
                    asyncio.gather(
                        *(
                            self.engine.generate(
                                ids,
                                GenerateParams(
                                    max_tokens=max_tokens,
                                    temperature=request.temperature,
                                    top_p=request.top_p,
                                    seed=None if request.seed is None else request.seed + index,
                                ),
                            )
                            for index, ids in enumerate(prompts)
                        )
                    )
                )
        finally:
            self._tasks_in_flight -= 1
        completion_tokens = sum(len(r.ids) for r in results)
        prompt_tokens = sum(len(p) for p in prompts)
        # Each prompt plus its sample sits at positions 0 .. len-1 at the end of decoding: counted
        # like a scored sequence of the same tokens (prefill and decode cost the same per token).
        lengths = [len(p) + len(r.ids) for p, r in zip(prompts, results, strict=True)]
        self.metrics.teacher_tokens.labels("generated").inc(completion_tokens)
        return {
            "completions": [
                {"text": r.text, "ids": r.ids, "finish_reason": r.finish_reason} for r in results
            ],
            "usage": {
                "teacher_prompt_tokens": prompt_tokens,
                "teacher_completion_tokens": completion_tokens,
                "teacher_tokens": prompt_tokens + completion_tokens,
                "teacher_flops": self._teacher_flops(lengths),
            },
            "teacher": self._teacher_stamp(),
        }


def _flops_info(model: FlopModel | None) -> dict[str, Any] | None:
    """``/v1/info``'s ``teacher.flops``: the FLOP model's coefficients and how to use them."""
    if model is None:
        return None
    return {
        **model.as_dict(),
        "per_token": "2 * matmul_params + attention_coeff * t, t = tokens before it in context",
        "usage": "teacher_flops sums this over positions 0..L-1 of every sequence (prompt + "
        "completion), alike for /v1/score and /v1/generate",
    }
