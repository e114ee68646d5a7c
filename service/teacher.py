"""One named teacher: its engine (supervised, ``supervisor.py``), admission limit and metrics
label, and its work: describing itself, scoring student sequences, generating."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from tokenbridge.service.admission import Admission
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines.base import GenerateParams, PositionScores, TeacherEngine
from tokenbridge.service.engines.flops import FlopModel
from tokenbridge.service.errors import (
    EngineUnavailableError,
    PayloadTooLargeError,
    ServiceError,
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
from tokenbridge.service.supervisor import EngineSupervisor, TeacherState
from tokenbridge.service.teacher_config import TeacherConfig
from tokenbridge.shared import responses
from tokenbridge.shared.protocol import (
    GenerateRequest,
    ScoreRequest,
)

__all__ = ["Teacher"]

logger = logging.getLogger("tokenbridge.service")

T = TypeVar("T")


class Teacher(EngineSupervisor):
    """One named teacher: its engine, admission control, restart supervisor and metrics label."""

    def __init__(
        self,
        config: TeacherConfig,
        service_config: ServiceConfig,
        engine: TeacherEngine,
        registry: StudentRegistry,
        metrics: ServiceMetrics,
    ) -> None:
        super().__init__(config, engine, metrics)
        #: The service-wide limits (body size, sequences, deadline) this teacher answers under.
        self.service_config = service_config
        self.registry = registry
        self.admission = Admission(
            config.max_tokens_in_flight, config.admission_wait_s, config.admission_queue
        )
        metrics.admission_waiting.labels(self.name).set_function(lambda: self.admission.waiting)
        self._in_flight_gauge = metrics.tokens_in_flight.labels(self.name)
        self._in_flight_gauge.set(0)

    async def _on_engine_started(self) -> None:
        """Pair the teacher with every registered student."""
        await asyncio.to_thread(self.registry.add_teacher, self.name, self.engine.tokenizer)

    # -- description ---------------------------------------------------------------------------

    @property
    def max_top_k(self) -> int:
        """The largest ``top_k`` this teacher answers."""
        return min(self.config.max_top_k, self.engine.info.max_top_k)

    def limits(self) -> responses.TeacherLimits:
        """This teacher's limits (``/v1/info``'s ``limits``; the service-wide ones included)."""
        config, service = self.config, self.service_config
        return {
            "max_model_len": self.engine.info.max_model_len,
            "max_body_bytes": service.max_body_bytes,
            "max_sequences": service.max_sequences,
            "max_request_tokens": config.max_request_tokens,
            "max_tokens_in_flight": config.max_tokens_in_flight,
            "admission_wait_s": config.admission_wait_s,
            "admission_queue": config.admission_queue,
            "max_generate_tokens": config.max_generate_tokens,
            "request_timeout_s": service.request_timeout_s,
        }

    def describe(self) -> responses.TeacherInfo:
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

    def _teacher_stamp(self) -> responses.TeacherStamp:
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

    async def score(self, request: ScoreRequest, student: StudentEntry) -> responses.ScoreResponse:
        """``POST /v1/score``: the mapped teacher signals of every sequence, in request order."""
        self._require_ready()
        self._check_top_k(request.top_k)
        if len(request.sequences) > self.service_config.max_sequences:
            raise PayloadTooLargeError(
                f"{len(request.sequences)} sequences in one request; max_sequences is "
                f"{self.service_config.max_sequences}: split the batch"
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
    ) -> list[responses.ScoredSequenceWire]:
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

    async def generate(self, request: GenerateRequest) -> responses.GenerateResponse:
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
        if len(request.prompts) > self.service_config.max_sequences:
            raise PayloadTooLargeError(
                f"{len(request.prompts)} prompts; max_sequences is "
                f"{self.service_config.max_sequences}"
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


def _flops_info(model: FlopModel | None) -> responses.TeacherFlops | None:
    """``/v1/info``'s ``teacher.flops``: the FLOP model's coefficients and how to use them."""
    if model is None:
        return None
    return {
        **model.as_dict(),
        "per_token": "2 * matmul_params + attention_coeff * t, t = tokens before it in context",
        "usage": "teacher_flops sums this over positions 0..L-1 of every sequence (prompt + "
        "completion), alike for /v1/score and /v1/generate",
    }
