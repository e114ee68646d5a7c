"""The teacher service itself, independent of HTTP: teachers, lifecycle, scoring, generation.

``app`` wraps a ``TeacherService`` in routes; tests and benchmarks may drive it directly. The
service hosts one or more named ``Teacher``s, each with its own engine, admission limit, restart
supervisor and metrics label, and one ``StudentRegistry`` they all share (pair tables per
(teacher, student)). A request names its teacher or gets the default one.

A teacher (``teacher.py``) is supervised (``supervisor.py``): when its engine fails it turns
unready while the engine is restarted; other teachers keep serving meanwhile. Once every teacher
has failed the service calls ``on_failed`` (``tokenbridge serve`` then exits non-zero, so that a
supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from tokenbridge.service.admission import Admission
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.base import TeacherEngine
from tokenbridge.service.errors import (
    NotReadyError,
    UnknownTeacherError,
    UnprocessableError,
)
from tokenbridge.service.metrics import ServiceMetrics
from tokenbridge.service.registry import StudentEntry, StudentRegistry
from tokenbridge.service.supervisor import TeacherState
from tokenbridge.service.teacher import Teacher
from tokenbridge.shared import responses
from tokenbridge.shared.protocol import (
    API_VERSION,
    GenerateRequest,
    RegisterTokenizerRequest,
    ScoreRequest,
)

__all__ = ["Teacher", "TeacherService"]

logger = logging.getLogger("tokenbridge.service")


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
        self.teachers = {
            name: Teacher(config.teacher_config(name), config, engine, self.registry, self.metrics)
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

    def info(self) -> responses.Info:
        """``GET /v1/info``: every teacher (``teachers``); the top-level ``teacher``,
        ``max_top_k`` and ``limits`` are the default teacher's (``None`` and the service-wide
        limits without one)."""
        teachers = [teacher.describe() for teacher in self.teachers.values()]
        config = self.config
        default: responses.TeacherInfo | None = None
        limits: responses.TeacherLimits | responses.ServiceLimits = {
            "max_body_bytes": config.max_body_bytes,
            "max_sequences": config.max_sequences,
            "request_timeout_s": config.request_timeout_s,
        }
        if self.default_teacher is not None:
            default = next(t for t in teachers if t["name"] == self.default_teacher)
            # A copy: the route adds the caller's key limits to it.
            limits = default["limits"].copy()
        return {
            "api_version": API_VERSION,
            "state": self.state,
            "teacher": default,
            "max_top_k": None if default is None else default["max_top_k"],
            "limits": limits,
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

    def describe_student(self, entry: StudentEntry) -> responses.StudentDescription:
        """A registration with how well it maps onto each teacher."""
        pairings = self.registry.pairings(entry)
        ordered = {name: pairings[name] for name in self.teachers if name in pairings}
        return entry.describe(ordered, self.default_teacher)

    async def score(
        self, request: ScoreRequest, teacher: Teacher | None = None
    ) -> responses.ScoreResponse:
        """``POST /v1/score`` for ``teacher``, already resolved, or the one the request names."""
        teacher = teacher or self.teacher(request.teacher)
        self._require_started()
        student = self.registry.get(request.student_tokenizer)
        return await teacher.score(request, student)

    async def generate(
        self, request: GenerateRequest, teacher: Teacher | None = None
    ) -> responses.GenerateResponse:
        """``POST /v1/generate`` for ``teacher``, already resolved, or the one the request
        names."""
        teacher = teacher or self.teacher(request.teacher)
        self._require_started()
        return await teacher.generate(request)
