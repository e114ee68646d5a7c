"""A teacher's engine under supervision: its states, and bringing a failed engine back.

A teacher's states: ``starting`` → ``ready`` → ``draining`` → ``stopped``. Only ``ready`` accepts
work (503 otherwise). When its engine fails (it died or ran out of memory; noticed by a request, a
readiness probe or a watchdog that looks every ``health_check_interval_s``) the teacher turns
``restarting``: it stops the engine and starts it again after ``engine_restart_backoff_s``
(doubling each time in a row), and is ``ready`` again once the engine is healthy. A request the
engine serves resets the count; after ``engine_restarts`` restarts in a row without one, the
teacher is ``failed`` for good, and ``on_failed`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum

from tokenbridge.service.engines.base import TeacherEngine
from tokenbridge.service.errors import NotReadyError
from tokenbridge.service.metrics import ServiceMetrics
from tokenbridge.service.teacher_config import TeacherConfig

logger = logging.getLogger("tokenbridge.service")


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


class EngineSupervisor:
    """The supervised side of a teacher (``teacher.Teacher`` builds on it): its state, start and
    drain, the watchdog, restarts with backoff, and giving up."""

    #: Seconds between the watchdog's looks at the engine's health while the teacher is ready.
    health_check_interval_s = 0.5

    def __init__(
        self, config: TeacherConfig, engine: TeacherEngine, metrics: ServiceMetrics
    ) -> None:
        self.name = name = config.name
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self._ready_gauge = metrics.ready.labels(name)
        self._ready_gauge.set(0)
        self.state = TeacherState.STARTING
        #: Requests at work on the engine (``stop`` waits for them, bounded).
        self._tasks_in_flight = 0
        #: Called once when the engine failed and its restarts are spent (the service is told).
        self.on_failed: Callable[[], None] | None = None
        #: Restarts that brought the engine back since the service started.
        self.engine_restarts = 0
        self._restarts_in_a_row = 0
        self._recovery: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False

    async def _on_engine_started(self) -> None:
        """What the teacher does once its engine is up for the first time, before it is ready."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and the teacher's own preparation (``_on_engine_started``); then
        accept work."""
        started = time.monotonic()
        self._stopped = False  # an app's lifespan may run again after a stop (tests do)
        await self.engine.start()
        await self._on_engine_started()
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
