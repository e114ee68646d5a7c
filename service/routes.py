"""The routes, one router per feature, each thin: parse the body, resolve the teacher once,
hand the work to the service object, answer. Everything else lives below them: HTTP plumbing in
``http.py``, the work in ``core.py`` and ``teacher.py``, the layout in ``shared/responses.py``.

Every router but ``health`` requires a Bearer key when keys are configured (``authorise``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenbridge.service import completions, openapi
from tokenbridge.service.core import TeacherService
from tokenbridge.service.errors import NotReadyError, UnprocessableError
from tokenbridge.service.http import (
    authorise,
    gate_of,
    parse,
    respond,
    service_of,
    teacher_for,
    until_disconnect,
)
from tokenbridge.service.teacher import Teacher
from tokenbridge.shared import responses
from tokenbridge.shared.protocol import (
    CompletionRequest,
    GenerateRequest,
    RegisterTokenizerRequest,
    ScoreRequest,
)

__all__ = ["ROUTERS"]


def _documented(method: str, path: str) -> dict[str, Any]:
    """The keyword arguments of a route: raw ``Response`` answers and its OpenAPI text."""
    return {"response_class": Response, "openapi_extra": openapi.operation(method, path)}


# -- health: liveness (no key), readiness, metrics ---------------------------------------------

health = APIRouter()
watched = APIRouter(dependencies=[Depends(authorise)])


@health.get("/healthz")
async def healthz(request: Request) -> Response:
    """Liveness (no key needed): 200 while the process can serve or get back to serving
    (an engine restart included); 503 once the service gave up on every teacher."""
    state = service_of(request).state
    if state == "failed":
        failed: responses.Health = {"status": "failed", "state": "failed"}
        return JSONResponse(failed, status_code=503)
    alive: responses.Health = {"status": "alive", "state": state}
    return JSONResponse(alive)


@watched.get("/readyz", **_documented("GET", "/readyz"))
async def readyz(request: Request) -> Response:
    """Readiness: 200 while some teacher accepts work (``?teacher=NAME``: that teacher),
    503 while none does (loading, restarting, draining, failed). The body gives every
    teacher's state and names the unready ones."""
    unknown = sorted(set(request.query_params) - {"teacher"})
    if unknown:
        raise UnprocessableError(
            f"unknown query parameters {[u[:40] for u in unknown[:5]]}; /readyz takes "
            "only 'teacher'"
        )
    service = service_of(request)
    teachers = service.teacher_readiness()
    asked = request.query_params.get("teacher")
    ready, state = service.teacher(asked).readiness() if asked is not None else service.readiness()
    body: responses.Readiness = {
        "ready": ready,
        "state": state,
        "teachers": {name: {"ready": r, "state": st} for name, (r, st) in teachers.items()},
        "unready": [name for name, (r, _) in teachers.items() if not r],
    }
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "2"}
    )


@watched.get("/metrics", **_documented("GET", "/metrics"))
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    registry = service_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@watched.get("/v1/info", **_documented("GET", "/v1/info"))
async def info(request: Request) -> Response:
    """Teacher model, engine, versions, vocabulary, max K, limits, log-prob semantics, and the
    caller's own quota."""
    gate = gate_of(request)
    described = service_of(request).info()
    described["limits"]["key_tokens_per_minute"] = gate.tokens_per_minute
    described["limits"]["key_max_requests_in_flight"] = gate.quotas.max_requests_in_flight
    quota = gate.quota(request)
    if quota is not None:
        described["quota"] = quota
    return respond(request, described)


# -- tokenizers: student registrations -------------------------------------------------------

tokenizers = APIRouter(dependencies=[Depends(authorise)])


@tokenizers.post("/v1/tokenizers", **_documented("POST", "/v1/tokenizers"))
async def register_tokenizer(request: Request) -> Response:
    """Register a student tokenizer by hub name, path or uploaded ``tokenizer.json``."""
    body = await parse(request, RegisterTokenizerRequest)
    service = service_of(request)
    with gate_of(request).hold(request):
        entry, created = await service.register(body)
    described = await asyncio.to_thread(service.describe_student, entry)
    registration: responses.Registration = {**described, "created": created}
    return respond(request, registration, 201 if created else 200)


@tokenizers.get("/v1/tokenizers", **_documented("GET", "/v1/tokenizers"))
async def list_tokenizers(request: Request) -> Response:
    """Every registered student tokenizer."""
    entries = service_of(request).registry.list()
    listed: responses.StudentList = {"tokenizers": [e.summary() for e in entries]}
    return respond(request, listed)


_ONE = "/v1/tokenizers/{student_id}"


@tokenizers.get(_ONE, **_documented("GET", _ONE))
async def get_tokenizer(request: Request) -> Response:
    """One registration with its vocabulary overlap and 1:1 share on a probe text."""
    service = service_of(request)
    entry = service.registry.get(request.path_params["student_id"])
    return respond(request, await asyncio.to_thread(service.describe_student, entry))


@tokenizers.delete(_ONE, **_documented("DELETE", _ONE))
async def delete_tokenizer(request: Request) -> Response:
    """Remove a registration."""
    registry = service_of(request).registry
    entry = await asyncio.to_thread(registry.delete, request.path_params["student_id"])
    deleted: responses.Deleted = {"id": entry.id, "deleted": True}
    return respond(request, deleted)


# -- teaching: scoring and generating ----------------------------------------------------------

teaching = APIRouter(dependencies=[Depends(authorise)])


BodyT = TypeVar("BodyT", ScoreRequest, GenerateRequest)
AnswerT = TypeVar("AnswerT", responses.ScoreResponse, responses.GenerateResponse)


async def _teach(
    request: Request,
    model: type[BodyT] | BodyT,
    work: Callable[[TeacherService, BodyT, Teacher], Awaitable[AnswerT]],
    teacher: Teacher | None = None,
) -> tuple[Teacher, AnswerT]:
    """A teaching request's common path: parse (unless ``model`` is the body already), resolve
    the teacher once, run ``work`` under the caller's quota and the deadline, charge the
    teacher tokens it reports."""
    body = await parse(request, model) if isinstance(model, type) else model
    if teacher is None:
        teacher = teacher_for(request, body.teacher)
    service, gate = service_of(request), gate_of(request)
    with gate.hold(request):
        result = await until_disconnect(
            request, work(service, body, teacher), service.config.request_timeout_s
        )
    gate.charge(request, result["usage"]["teacher_tokens"], teacher)
    return teacher, result


@teaching.post("/v1/score", **_documented("POST", "/v1/score"))
async def score(request: Request) -> Response:
    """Teacher log-probs and sparse distributions over the student's vocabulary."""
    teacher, result = await _teach(request, ScoreRequest, TeacherService.score)
    encode_started = time.perf_counter()
    response = respond(request, result)
    service_of(request).metrics.stage_seconds.labels("encode", teacher.name).observe(
        time.perf_counter() - encode_started
    )
    return response


@teaching.post("/v1/generate", **_documented("POST", "/v1/generate"))
async def generate(request: Request) -> Response:
    """Teacher samples for prompts (the SFT baseline's data)."""
    _, result = await _teach(request, GenerateRequest, TeacherService.generate)
    return respond(request, result)


# -- the vLLM-compatible face (docs/vllm-face.md) ----------------------------------------------

vllm_face = APIRouter(dependencies=[Depends(authorise)])
_PAIR = completions.PAIR_PATH


def _pair_of(request: Request) -> completions.PairModel:
    """The pair a base URL names."""
    params = request.path_params
    teacher_for(request, params["teacher"])
    return completions.resolve_pair(service_of(request), params["teacher"], params["student_id"])


async def _complete(request: Request, base: completions.PairModel | None) -> Response:
    """Score the body's ids as ``/v1/score`` would and answer in vLLM's layout; keys, quotas,
    admission, deadline and metrics as for ``/v1/score``."""
    body = await parse(request, CompletionRequest)
    service = service_of(request)
    pair = completions.resolve_model(service, body.model, base)
    teacher = teacher_for(request, pair.teacher.name)
    scoring, plans = await asyncio.to_thread(completions.score_request, body, pair)
    _, scored = await _teach(request, scoring, TeacherService.score, teacher)
    request_id = request.scope["state"].get("request_id") or completions.new_request_id()
    answer = await asyncio.to_thread(completions.answer, body, pair, scored, plans, request_id)
    return respond(request, answer)


@vllm_face.get("/v1/models", **_documented("GET", "/v1/models"))
async def list_models(request: Request) -> Response:
    """Every (teacher, student) pair as a vLLM model."""
    pairs = completions.pair_models(service_of(request))
    listed: responses.ModelList = {
        "object": "list",
        "data": [completions.model_card(pair) for pair in pairs],
    }
    return respond(request, listed)


@vllm_face.post("/v1/completions", **_documented("POST", "/v1/completions"))
async def complete(request: Request) -> Response:
    """vLLM's ``prompt_logprobs`` over the student's vocabulary, for the pair ``model`` names."""
    return await _complete(request, None)


@vllm_face.get(_PAIR + "/health", **_documented("GET", _PAIR + "/health"))
async def pair_health(request: Request) -> Response:
    """200 (empty) while the pair's teacher accepts work, as ``vllm serve``'s ``/health``;
    503 while it does not; 404 for an unknown teacher or student."""
    pair = _pair_of(request)
    ready, state = pair.teacher.readiness()
    if not ready:
        raise NotReadyError(f"teacher {pair.teacher.name!r} is {state}")
    return Response(status_code=200)


@vllm_face.get(_PAIR + "/v1/models", **_documented("GET", _PAIR + "/v1/models"))
async def pair_models(request: Request) -> Response:
    """The pair, as the one model of a single-model server."""
    listed: responses.ModelList = {
        "object": "list",
        "data": [completions.model_card(_pair_of(request))],
    }
    return respond(request, listed)


@vllm_face.post(_PAIR + "/v1/completions", **_documented("POST", _PAIR + "/v1/completions"))
async def pair_complete(request: Request) -> Response:
    """``/v1/completions`` for the pair of the base URL."""
    return await _complete(request, _pair_of(request))


#: Every router, in the order the app mounts them.
ROUTERS = (health, watched, tokenizers, teaching, vllm_face)
