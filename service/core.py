"""The teacher service itself, independent of HTTP: teachers, lifecycle, scoring, generation.

``app`` wraps a ``TeacherService`` in routes; tests and benchmarks may drive it directly. The
service hosts one or more named ``Teacher``s, each with its own engine, admission limit, restart
supervisor and metrics label, and one ``StudentRegistry`` they all share (pair tables per
(teacher, student)). A request names its teacher or gets the default one.

A teacher's states: ``starting`` → ``ready`` → ``draining`` → ``stopped``. Only ``ready`` accepts
work (503 otherwise). When its engine fails (it died or ran out of memory; noticed by a request, a
readiness probe or a watchdog that looks every ``health_check_interval_s``) the teacher turns
``restarting``: it stops the engine and starts it again after ``engine_restart_backoff_s``
(doubling each time in a row), and is ``ready`` again once the engine is healthy. A request the
engine serves resets the count; after ``engine_restarts`` restarts in a row without one, the
teacher is ``failed`` for good. Other teachers keep serving meanwhile. Once every teacher has
failed the service calls ``on_failed`` (``tokenbridge serve`` then exits non-zero, so that a
supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, TypeVar

from tokenbridge.service.admission import Admission
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.base import GenerateParams, PositionScores, TeacherEngine
from tokenbridge.service.engines.flops import FlopModel
from tokenbridge.service.errors import (
    EngineUnavailableError,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    UnknownTeacherError,
    UnprocessableError,
)
from tokenbridge.service.metrics import ServiceMetrics
from tokenbridge.service.registry import Pairing, StudentEntry, StudentRegistry
from tokenbridge.service.scoring import (
    PreparedSequence,
    map_candidates,
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

__all__ = ["Teacher", "TeacherService"]

logger = logging.getLogger("tokenbridge.service")

T = TypeVar("T")


class TeacherState(StrEnum):
    """Where a teacher's engine is: ``starting``, then ``ready``; ``restarting`` while a failed
    engine is brought back, ``failed`` once the restarts are spent (final); ``draining`` and
    ``stopped`` at shutdown. The values are what ``/health`` and ``/v1/info`` report."""

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


#: The longest wait between two engine restarts, however many came before.
_MAX_RESTART_BACKOFF_S = 60.0


class Teacher:
    """One named teacher: its engine, admission control, restart supervisor and metrics label."""

    #: Seconds between the watchdog's looks at the engine's health while the teacher is ready.
    health_check_interval_s = 0.5

    def __init__(
        self,
        name: str,
        config: ServiceConfig,
        engine: TeacherEngine,
        registry: StudentRegistry,
        metrics: ServiceMetrics,
    ) -> None:
        self.name = name
        self.config = config
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.admission = Admission(
            config.max_tokens_in_flight, config.admission_wait_s, config.admission_queue
        )
        metrics.admission_waiting.labels(name).set_function(lambda: self.admission.waiting)
        self._ready_gauge = metrics.ready.labels(name)
        self._in_flight_gauge = metrics.tokens_in_flight.labels(name)
        self._ready_gauge.set(0)
        self._in_flight_gauge.set(0)
        self.state = TeacherState.STARTING
        self._tasks_in_flight = 0
        #: Called once when the engine failed and its restarts are spent (the service is told).
        self.on_failed: Callable[[], None] | None = None
        #: Restarts that brought the engine back since the service started.
        self.engine_restarts = 0
        self._restarts_in_a_row = 0
        self._recovery: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and pair the teacher with every registered student; then accept
        work."""
        started = time.monotonic()
        self._stopped = False  # an app's lifespan may run again after a stop (tests do)
        await self.engine.start()
        await asyncio.to_thread(self.registry.add_teacher, self.name, self.engine.tokenizer)
        self.state = TeacherState.READY
        self._ready_gauge.set(1)
        logger.info(
            "teacher %s (%s) is ready on %s %s, started in %.1f s",
            self.name, self.engine.info.model, self.engine.info.backend, self.engine.info.device,
            time.monotonic() - started,
        )  # fmt: skip
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name=f"engine-watchdog-{self.name}"
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
        failed = self.state == TeacherState.FAILED
        self.state = TeacherState.FAILED if failed else TeacherState.DRAINING
        self._ready_gauge.set(0)
        deadline = time.monotonic() + drain_timeout_s
        while self._tasks_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.engine.stop()
        self.state = TeacherState.FAILED if failed else TeacherState.STOPPED
        logger.info("teacher %s stopped", self.name)

    def readiness(self) -> tuple[bool, str]:
        """Whether work is accepted now, and the state's name (``restarting`` while a failed
        engine is being brought back, ``failed`` once the service gave up on it)."""
        if self.state == TeacherState.READY and not self.engine.healthy():
            self._engine_failed("the engine is no longer healthy (it died or ran out of memory)")
        return self.state == TeacherState.READY, self.state.value

    # -- engine failures -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice an engine that dies while no request is there to see it."""
        while True:
            await asyncio.sleep(self.health_check_interval_s)
            try:
                self.readiness()
            except Exception:  # the watchdog must outlive a bad look at the engine
                logger.exception("the health check of teacher %s failed", self.name)

    def _engine_failed(self, reason: str) -> None:
        """Turn unready at once and start bringing the engine back (in a task of its own)."""
        if self.state != TeacherState.READY:
            return
        self._ready_gauge.set(0)
        if self._restarts_in_a_row >= self.config.engine_restarts:
            self.state = TeacherState.FAILED  # no restart left: final at once
            recovery = self._give_up(reason)
        else:
            self.state = TeacherState.RESTARTING
            logger.error(
                "teacher %s: %s; it is unready (503) while the service restarts it",
                self.name, reason,
            )  # fmt: skip
            recovery = self._recover(reason)
        self._recovery = asyncio.get_running_loop().create_task(
            recovery, name=f"engine-recovery-{self.name}"
        )

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
                logger.warning(
                    "teacher %s: stopping the failed engine raised %r; starting it anyway",
                    self.name, error,
                )  # fmt: skip
            logger.warning(
                "teacher %s: restarting the engine in %.1f s (restart %d of at most %d in a row)",
                self.name, delay, attempt, limit,
            )  # fmt: skip
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                await self.engine.start()
            except Exception as error:
                reason = f"restart {attempt} could not start the engine: {error!r}"
                logger.error("teacher %s: %s", self.name, reason)
                continue
            if not self.engine.healthy():
                reason = f"restart {attempt} left the engine unhealthy"
                logger.error("teacher %s: %s", self.name, reason)
                continue
            self.engine_restarts += 1
            self.metrics.engine_restarts.labels(self.name).inc()
            self.state = TeacherState.READY
            self._ready_gauge.set(1)
            logger.warning(
                "teacher %s: the engine is back after restart %d (started in %.1f s); ready again",
                self.name, attempt, time.monotonic() - started,
            )  # fmt: skip
            return
        await self._give_up(reason)

    async def _give_up(self, reason: str) -> None:
        """The engine is not coming back: ``failed`` for good, and tell whoever runs us."""
        self.state = TeacherState.FAILED
        self._ready_gauge.set(0)
        limit = self.config.engine_restarts
        tried = (
            f"{limit} restart{'s' if limit != 1 else ''} in a row did not bring it back"
            if limit
            else "engine restarts are off (engine_restarts = 0)"
        )
        logger.critical(
            "the engine of teacher %s failed and %s (last: %s); giving up: the teacher is failed "
            "for good (its readiness answers 503) until the service is restarted",
            self.name, tried, reason,
        )  # fmt: skip
        with contextlib.suppress(Exception):
            await self.engine.stop()
        if self.on_failed is not None:
            self.on_failed()

    def _require_ready(self) -> None:
        ready, state = self.readiness()
        if not ready:
            raise NotReadyError(
                f"teacher {self.name!r} is {state}"
                + ("; the service must be restarted to bring it back"
                   if state == TeacherState.FAILED else "; retry shortly")
            )  # fmt: skip

    # -- description ---------------------------------------------------------------------------

    @property
    def max_top_k(self) -> int:
        """The largest ``top_k`` this teacher answers."""
        return min(self.config.max_top_k, self.engine.info.max_top_k)

    def limits(self) -> dict[str, Any]:
        """This teacher's limits (``/v1/info``'s ``limits``; the service-wide ones included)."""
        config = self.config
        return {
            "max_model_len": self.engine.info.max_model_len,
            "max_body_bytes": config.max_body_bytes,
            "max_sequences": config.max_sequences,
            "max_request_tokens": config.max_request_tokens,
            "max_tokens_in_flight": config.max_tokens_in_flight,
            "admission_wait_s": config.admission_wait_s,
            "admission_queue": config.admission_queue,
            "max_generate_tokens": config.max_generate_tokens,
            "request_timeout_s": config.request_timeout_s,
        }

    def describe(self) -> dict[str, Any]:
        """The teacher as ``/v1/info`` describes it: model, engine, versions, vocabulary, state."""
        engine = self.engine.info
        vocab = self.registry.teacher_vocab(self.name)
        return {
            "name": self.name,
            "state": self.state.value,
            "ready": self.state == TeacherState.READY,
            "model": engine.model,
            "revision": engine.revision,
            "backend": engine.backend,
            "dtype": engine.dtype,
            "device": engine.device,
            "devices": list(self.config.devices),
            "versions": engine.versions,
            "vocab_size": engine.vocab_size,
            "tokenizer_size": vocab.size if vocab is not None else None,
            "vocab_hash": vocab.content_hash if vocab is not None else None,
            "has_chat_template": bool(getattr(self.engine.tokenizer, "chat_template", None)),
            "flops": _flops_info(engine.flop_model),
            "max_top_k": self.max_top_k,
            "candidate_scoring": engine.full_rows,
            "limits": self.limits(),
            "engine_restarts": self.engine_restarts,
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
            "name": self.name,
            "model": engine.model,
            "backend": engine.backend,
            "dtype": engine.dtype,
            "versions": engine.versions,
        }

    # -- scoring -------------------------------------------------------------------------------

    def _check_top_k(self, top_k: int) -> None:
        limit = self.max_top_k
        if top_k > limit:
            raise UnprocessableError(
                f"top_k {top_k} is above the maximum {limit} of teacher {self.name!r} (its "
                f"max_top_k in GET /v1/info); ask for top_k <= {limit}"
            )

    async def score(self, request: ScoreRequest, student: StudentEntry) -> dict[str, Any]:
        """``POST /v1/score``: the mapped teacher signals of every sequence, in request order."""
        self._require_ready()
        self._check_top_k(request.top_k)
        if len(request.sequences) > self.config.max_sequences:
            raise PayloadTooLargeError(
                f"{len(request.sequences)} sequences in one request; max_sequences is "
                f"{self.config.max_sequences}: split the batch"
            )
        if not self.engine.info.full_rows and any(
            s.candidate_ids is not None for s in request.sequences
        ):
            raise UnprocessableError(
                f"teacher {self.name!r} runs on the {self.engine.info.backend} engine, which "
                "returns no full rows: 'candidate_ids' (docs/mapping.md §4b) needs the "
                "transformers engine; leave the field out or ask another teacher"
            )
        pairing = await asyncio.to_thread(self.registry.pairing, self.name, student)
        top_k = request.top_k
        self._tasks_in_flight += 1
        try:
            started = time.perf_counter()
            teacher_tokenizer = self.engine.tokenizer
            max_len = self.engine.info.max_model_len
            prepared = await asyncio.to_thread(
                lambda: [
                    prepare(s, student, pairing, teacher_tokenizer, top_k, max_len)
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
                    self._in_flight_gauge.set(self.admission.in_flight)
                    scored = await self._run_engine(prepared)
            finally:
                self._in_flight_gauge.set(self.admission.in_flight)
            engine_done = time.perf_counter()
            sequences = await asyncio.to_thread(self._map_all, prepared, scored, pairing, top_k)
            mapped_at = time.perf_counter()
        finally:
            self._tasks_in_flight -= 1
        positions = sum(len(p.student_ids) for p in prepared)
        prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
        self.metrics.scored_positions.labels(self.name).inc(positions)
        self.metrics.teacher_tokens.labels("prompt", self.name).inc(prompt_tokens)
        self.metrics.teacher_tokens.labels("completion", self.name).inc(tokens - prompt_tokens)
        for stage, seconds in (
            ("prepare", prepared_at - started),
            ("engine", engine_done - prepared_at),
            ("mapping", mapped_at - engine_done),
        ):
            self.metrics.stage_seconds.labels(stage, self.name).observe(seconds)
        return {
            "top_k": top_k,
            "sequences": sequences,
            "usage": {
                "positions": positions,
                "teacher_prompt_tokens": prompt_tokens,
                "teacher_completion_tokens": tokens - prompt_tokens,
                "teacher_tokens": tokens,
                "teacher_flops": self._teacher_flops([p.teacher_tokens for p in prepared]),
                "teacher_engine_s": engine_done - prepared_at,
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
                    f"the engine of teacher {self.name!r} failed (out of memory or died); "
                    + (
                        "the service gave up on it and must be restarted"
                        if self.state == TeacherState.FAILED
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
        pairing: Pairing,
        top_k: int,
    ) -> list[dict[str, Any]]:
        out = []
        for item, rows in zip(prepared, scored, strict=True):
            scores = teacher_scores(item, rows, top_k)
            mapped = pairing.mapper.map(
                item.student_ids, item.view.ids, item.alignment, scores, top_k,
                item.view.untiled_bytes,
            )  # fmt: skip
            candidates = map_candidates(pairing.mapper, item, rows, mapped.scored_S)
            out.append(wire_sequence(mapped, item, top_k, candidates))
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
                engine_started = time.perf_counter()
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
                engine_s = time.perf_counter() - engine_started
        finally:
            self._tasks_in_flight -= 1
        completion_tokens = sum(len(r.ids) for r in results)
        prompt_tokens = sum(len(p) for p in prompts)
        # Each prompt plus its sample sits at positions 0 .. len-1 at the end of decoding: counted
        # like a scored sequence of the same tokens (prefill and decode cost the same per token).
        lengths = [len(p) + len(r.ids) for p, r in zip(prompts, results, strict=True)]
        self.metrics.teacher_tokens.labels("generated", self.name).inc(completion_tokens)
        return {
            "completions": [
                {"text": r.text, "ids": r.ids, "finish_reason": r.finish_reason} for r in results
            ],
            "usage": {
                "teacher_prompt_tokens": prompt_tokens,
                "teacher_completion_tokens": completion_tokens,
                "teacher_tokens": prompt_tokens + completion_tokens,
                "teacher_flops": self._teacher_flops(lengths),
                "teacher_engine_s": engine_s,
            },
            "teacher": self._teacher_stamp(),
        }


class TeacherService:
    """The service: named teachers, the student registry they share, metrics; routes requests.

    ``engines`` maps each teacher of ``config`` to its (not yet started) engine. Requests name
    their teacher (``teacher``) or get the default one (``config.default_teacher_name``).
    """

    def __init__(
        self,
        config: ServiceConfig,
        engines: dict[str, TeacherEngine],
        tokenizer_loader: Callable[[str], Any] | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a service needs at least one teacher")
        self.config = config
        self.metrics = ServiceMetrics()
        kwargs = {"loader": tokenizer_loader} if tokenizer_loader is not None else {}
        self.registry = StudentRegistry(
            config.data_dir,
            config.probe_text,
            tokenizer_dirs=config.tokenizer_dirs,
            **kwargs,
        )
        own = config.teacher_configs()
        self.teachers = {
            name: Teacher(name, own.get(name, config), engine, self.registry, self.metrics)
            for name, engine in engines.items()
        }
        for teacher in self.teachers.values():
            teacher.on_failed = self._teacher_failed
        names = list(self.teachers)
        self.default_teacher: str | None = (
            config.default_teacher_name if config.default_teacher_name in self.teachers
            else names[0] if len(names) == 1 else None
        )  # fmt: skip
        #: Called once every teacher has failed for good (``serve`` exits then).
        self.on_failed: Callable[[], None] | None = None
        self._started = False
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the stored registrations, then start every teacher at once; if one cannot
        start, stop the others and raise (a service must not come up missing a teacher)."""
        started = time.monotonic()
        loaded = await asyncio.to_thread(self.registry.load_all)
        results = await asyncio.gather(
            *(teacher.start() for teacher in self.teachers.values()), return_exceptions=True
        )
        failures = [
            (name, result)
            for name, result in zip(self.teachers, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if failures:
            await asyncio.gather(
                *(t.stop(0) for t in self.teachers.values()), return_exceptions=True
            )
            for name, error in failures:
                logger.critical("teacher %s did not start: %r", name, error)
            name, error = failures[0]
            raise RuntimeError(f"teacher {name!r} did not start: {error}") from error
        self._started, self._stopping = True, False
        logger.info(
            "ready: %d teacher%s (%s), %d stored students, started in %.1f s",
            len(self.teachers), "s" if len(self.teachers) != 1 else "",
            ", ".join(self.teachers), loaded, time.monotonic() - started,
        )  # fmt: skip

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, drain every teacher (bounded) and stop their engines."""
        self._stopping = True
        await asyncio.gather(*(t.stop(drain_timeout_s) for t in self.teachers.values()))
        logger.info("stopped")

    def _teacher_failed(self) -> None:
        if all(t.state == TeacherState.FAILED for t in self.teachers.values()):
            logger.critical("every teacher has failed; the service gives up")
            if self.on_failed is not None:
                self.on_failed()

    # -- state ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Whether some teacher accepts work now, and the service's state: the teachers' common
        state, or ``degraded`` while some serve and others do not."""
        states = {name: teacher.readiness()[1] for name, teacher in self.teachers.items()}
        return "ready" in states.values(), self._summary(states)

    def teacher_readiness(self) -> dict[str, tuple[bool, str]]:
        """Every teacher's readiness and state, by name."""
        return {name: teacher.readiness() for name, teacher in self.teachers.items()}

    @property
    def state(self) -> str:
        """The service's state (see ``readiness``), without looking at the engines again."""
        return self._summary({name: t.state for name, t in self.teachers.items()})

    @staticmethod
    def _summary(states: dict[str, str]) -> str:
        distinct = set(states.values())
        if len(distinct) == 1:
            return distinct.pop()
        if "ready" in distinct:
            return "degraded"
        for state in ("restarting", "starting", "draining", "stopped"):
            if state in distinct:
                return state
        return "failed"

    @property
    def engine_restarts(self) -> int:
        """Restarts that brought an engine back, over every teacher."""
        return sum(t.engine_restarts for t in self.teachers.values())

    def teacher(self, name: str | None) -> Teacher:
        """The teacher a request names (``None``: the default one); ``UnknownTeacherError``
        (404) for a name this service does not host."""
        if name is None:
            if self.default_teacher is None:
                raise UnprocessableError(
                    "this service hosts several teachers and none is the default: name one with "
                    f"'teacher' (one of {sorted(self.teachers)})"
                )
            name = self.default_teacher
        found = self.teachers.get(name)
        if found is None:
            raise UnknownTeacherError(
                f"no teacher {name[:64]!r} here; this service hosts {sorted(self.teachers)} "
                "(GET /v1/info describes them)"
            )
        return found

    # Single-teacher conveniences: the default (or only) teacher's engine and admission.

    @property
    def engine(self) -> TeacherEngine:
        """The default teacher's engine."""
        return self.teacher(None).engine

    @property
    def admission(self) -> Admission:
        """The default teacher's admission control."""
        return self.teacher(None).admission

    # -- description ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: every teacher (``teachers``); the top-level ``teacher``,
        ``max_top_k`` and ``limits`` are the default teacher's (``None`` without one)."""
        teachers = [teacher.describe() for teacher in self.teachers.values()]
        default = None if self.default_teacher is None else self.teachers[self.default_teacher]
        config = self.config
        service_limits = {
            "max_body_bytes": config.max_body_bytes,
            "max_sequences": config.max_sequences,
            "request_timeout_s": config.request_timeout_s,
        }
        top: dict[str, Any] = {"teacher": None, "max_top_k": None, "limits": service_limits}
        if default is not None:
            described = next(t for t in teachers if t["name"] == default.name)
            top = {
                "teacher": {k: v for k, v in described.items() if k not in ("max_top_k", "limits")},
                "max_top_k": described["max_top_k"],
                "limits": dict(described["limits"]),
            }
        return {
            "api_version": API_VERSION,
            "state": self.state,
            **top,
            "default_teacher": self.default_teacher,
            "teachers": teachers,
            "logprobs": {
                "temperature": 1.0,
                "positions": "row j is about completion token j given the prompt and tokens < j",
            },
            "encodings": ["application/msgpack", "application/json"],
            "students": len(self.registry),
        }

    # -- work ----------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started or self._stopping:
            state = "stopping" if self._stopping else "starting"
            raise NotReadyError(f"the service is {state}; retry shortly")

    async def register(self, request: RegisterTokenizerRequest) -> tuple[StudentEntry, bool]:
        """Register a student tokenizer and pair it with every teacher (off the event loop)."""
        self._require_started()
        return await asyncio.to_thread(self.registry.register, request)

    def describe_student(self, entry: StudentEntry) -> dict[str, Any]:
        """A registration with how well it maps onto each teacher."""
        pairings = self.registry.pairings(entry)
        ordered = {name: pairings[name] for name in self.teachers if name in pairings}
        return entry.describe(ordered, self.default_teacher)

    async def score(self, request: ScoreRequest) -> dict[str, Any]:
        """``POST /v1/score`` for the teacher the request names."""
        teacher = self.teacher(request.teacher)
        self._require_started()
        student = self.registry.get(request.student_tokenizer)
        return await teacher.score(request, student)

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        """``POST /v1/generate`` for the teacher the request names."""
        teacher = self.teacher(request.teacher)
        self._require_started()
        return await teacher.generate(request)


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
