"""The teacher service itself, independent of HTTP: lifecycle, scoring, generation, registry.

``app`` wraps a ``TeacherService`` in routes; tests and benchmarks may drive it directly.
States: ``starting`` → ``ready`` → ``draining`` → ``stopped``; ``failed`` when the engine dies.
Only ``ready`` accepts work (503 otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

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


class TeacherService:
    """One teacher engine, its student registry, admission control and metrics."""

    def __init__(
        self,
        config: ServiceConfig,
        engine: TeacherEngine,
        tokenizer_loader: Callable[[str], Any] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = ServiceMetrics()
        self.admission = Admission(config.max_tokens_in_flight)
        self.state = "starting"
        self._loader = tokenizer_loader
        self._registry: StudentRegistry | None = None
        self._tasks_in_flight = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, load the registry; then accept work."""
        started = time.monotonic()
        await self.engine.start()
        kwargs = {"loader": self._loader} if self._loader is not None else {}
        registry = StudentRegistry(
            self.config.data_dir, self.engine.tokenizer, self.config.probe_text, **kwargs
        )
        loaded = await asyncio.to_thread(registry.load_all)
        self._registry = registry
        self.state = "ready"
        self.metrics.ready.set(1)
        logger.info(
            "ready: teacher %s on %s, %d stored students, started in %.1f s",
            self.engine.info.model, self.engine.info.backend, loaded, time.monotonic() - started,
        )  # fmt: skip

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, wait for requests in flight (bounded), stop the engine."""
        if self.state == "stopped":
            return
        self.state = "draining"
        self.metrics.ready.set(0)
        deadline = time.monotonic() + drain_timeout_s
        while self._tasks_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.engine.stop()
        self.state = "stopped"
        logger.info("stopped")

    def readiness(self) -> tuple[bool, str]:
        """Whether work is accepted now, and the state's name."""
        if self.state == "ready" and not self.engine.healthy():
            self.state = "failed"
            self.metrics.ready.set(0)
            logger.error("the engine is no longer healthy; readiness turns 503")
        return self.state == "ready", self.state

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
                with self.admission.admit(tokens):
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

        try:
            return list(await asyncio.gather(*(one(p) for p in prepared)))
        except ServiceError:
            raise
        except Exception as error:
            if not self.engine.healthy():
                self.readiness()
                raise EngineUnavailableError(
                    "the teacher engine failed (out of memory or died); it is unready now"
                ) from error
            raise

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
        if request.max_tokens > self.config.max_generate_tokens:
            raise UnprocessableError(
                f"max_tokens {request.max_tokens} is above max_generate_tokens "
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
            if len(ids) + request.max_tokens > max_len:
                raise PayloadTooLargeError(
                    f"a prompt of {len(ids)} teacher tokens plus max_tokens {request.max_tokens} "
                    f"exceeds max_model_len {max_len}"
                )
        tokens = sum(len(p) + request.max_tokens for p in prompts)
        self._tasks_in_flight += 1
        try:
            with self.admission.admit(tokens):
                results = await asyncio.gather(
                    *(
                        self.engine.generate(
                            ids,
                            GenerateParams(
                                max_tokens=request.max_tokens,
                                temperature=request.temperature,
                                top_p=request.top_p,
                                seed=None if request.seed is None else request.seed + index,
                            ),
                        )
                        for index, ids in enumerate(prompts)
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
