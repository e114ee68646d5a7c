"""The HTTP face of the teacher service: app factory, thin routes, one error mapper.

Bodies are msgpack by default (``application/msgpack``) and JSON when the request says so; the
answer's encoding follows ``Accept`` when it names one of the two, else the request body's, else
msgpack. Every route but ``/healthz`` requires a Bearer key when keys are configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbridge.service import openapi
from tokenbridge.service.config import DEFAULT_TEACHER, NO_TEACHER, ServiceConfig, hash_api_key
from tokenbridge.service.core import TeacherService
from tokenbridge.service.engines.base import TeacherEngine
from tokenbridge.service.errors import (
    BadRequestError,
    DeadlineExceededError,
    ForbiddenError,
    PayloadTooLargeError,
    QuotaExceededError,
    ServiceError,
    UnauthorizedError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from tokenbridge.service.quotas import KeyQuotas, key_id
from tokenbridge.shared import responses
from tokenbridge.shared.codec import JSON, MSGPACK, MSGPACK_TYPES, body_encoding, pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import GenerateRequest, RegisterTokenizerRequest, ScoreRequest

__all__ = ["create_app"]

logger = logging.getLogger("tokenbridge.service.http")

ModelT = TypeVar("ModelT", bound=BaseModel)


# -- encodings -------------------------------------------------------------------------------


def _request_encoding(request: Request) -> str:
    header = request.headers.get("content-type")
    encoding = body_encoding(header)
    if encoding is None:
        raise UnsupportedMediaTypeError(
            f"content type {header!r} is not supported; send application/msgpack or "
            "application/json"
        )
    return encoding


def _response_encoding(request: Request) -> str:
    accept = request.headers.get("accept", "").lower()
    wants_json = JSON in accept
    wants_msgpack = any(t in accept for t in MSGPACK_TYPES)
    if wants_json != wants_msgpack:
        return JSON if wants_json else MSGPACK
    return body_encoding(request.headers.get("content-type")) or MSGPACK


def _respond(
    request: Request, value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    encoding = _response_encoding(request)
    body = pack(value, encoding)
    state = request.app.state
    state.service.metrics.payload_bytes.labels("out").observe(len(body))
    return Response(body, status_code=status, media_type=encoding, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body has {declared} bytes; max_body_bytes is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body exceeds max_body_bytes ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[ModelT]) -> ModelT:
    service: TeacherService = request.app.state.service
    encoding = _request_encoding(request)
    body = await _read_body(request, service.config.max_body_bytes)
    service.metrics.payload_bytes.labels("in").observe(len(body))
    if not body:
        raise BadRequestError("the request has no body")
    try:
        value = unpack(body, encoding)
    except CodecError as error:
        raise BadRequestError(str(error)) from None
    if not isinstance(value, dict):
        raise UnprocessableError(f"the body must be a map/object; got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise UnprocessableError(_validation_message(error)) from None


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:10]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _http_code(status: int) -> str:
    """The error ``code`` of a routing refusal: ``not_found``, ``method_not_allowed``..."""
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


# -- middleware ------------------------------------------------------------------------------


def _route_label(path: str) -> str:
    if path.startswith("/v1/tokenizers/"):
        return "/v1/tokenizers/{id}"
    known = {
        "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/tokenizers", "/v1/score",
        "/v1/generate",
    }  # fmt: skip
    return path if path in known else "other"


_NOT_A_FAILURE = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


def _internal_error_body(request_id: str) -> responses.ErrorBody:
    return {
        "error": {
            "code": "internal",
            "message": f"internal error (request {request_id}); the service log has the details",
        }
    }


class _CatchPanics:
    """A 500 with the error body for a ``BaseException`` that is not an ``Exception``: the Rust
    ``tokenizers`` library reports a panic as ``pyo3_runtime.PanicException``, which Starlette's
    handlers (``Exception`` only) would let out of the app. The sources catch what they expect;
    this is the net behind them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            raise
        except BaseException as error:
            if isinstance(error, _NOT_A_FAILURE) or started:
                raise
            request_id = scope.get("state", {}).get("request_id", "?")
            logger.error(
                "unexpected %s in request %s", type(error).__name__, request_id, exc_info=error
            )
            body = pack(_internal_error_body(request_id), JSON)
            headers = [(b"content-type", JSON.encode()), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})


class _Observe:
    """Counts and times every request, tags it with a request id and logs one line for it."""

    def __init__(self, app: ASGIApp, service: TeacherService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_label(scope["path"])
            caller = scope["state"].get("key_id")
            teacher = scope["state"].get("teacher", "")
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status), teacher).inc()
            metrics.latency.labels(route).observe(elapsed)
            logger.info(
                "request",
                extra={
                    "request_id": request_id, "method": scope["method"], "route": route,
                    "status": status, "duration_ms": round(elapsed * 1000, 2),
                    **({"key_id": caller} if caller else {}),
                    **({"teacher": teacher} if teacher else {}),
                },
            )  # fmt: skip


# -- the app ---------------------------------------------------------------------------------

T = TypeVar("T")


async def _until_disconnect(request: Request, work: Awaitable[T], timeout_s: float) -> T:
    """Run ``work`` under the per-request deadline; abandon it if the caller goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(timeout_s):
            return await task
    except TimeoutError:
        raise DeadlineExceededError(
            f"the request took longer than request_timeout_s ({timeout_s} s) and was abandoned; "
            "send fewer or shorter sequences"
        ) from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _engines(
    config: ServiceConfig,
    engine: TeacherEngine | None,
    engines: dict[str, TeacherEngine] | None,
) -> dict[str, TeacherEngine]:
    """Every teacher's engine: those given, the others built from their configs."""
    given = dict(engines or {})
    own = config.teacher_configs()
    if engine is not None:
        if len(own) > 1:
            raise ValueError("engine= serves a single teacher; pass engines= by name instead")
        given[next(iter(own), DEFAULT_TEACHER)] = engine
    unknown = sorted(set(given) - set(own) - ({DEFAULT_TEACHER} if not own else set()))
    if unknown:
        raise ValueError(f"engines {unknown} are no teachers of the config ({sorted(own)})")
    if not given and not own:
        raise ValueError(NO_TEACHER)
    from tokenbridge.service.engines import build_engine

    return {name: given.get(name) or build_engine(own[name]) for name in own or given}


def create_app(
    config: ServiceConfig,
    engine: TeacherEngine | None = None,
    tokenizer_loader: Callable[[str], Any] | None = None,
    engines: dict[str, TeacherEngine] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``config``'s teachers. Tests may pass engines: ``engine`` for a
    single teacher, ``engines`` by teacher name (the others are built from the config).

    The engines start in the app's lifespan and stop (after draining) when the server shuts
    down; readiness is 503 before and after.
    """
    service = TeacherService(config, _engines(config, engine, engines), tokenizer_loader)
    key_hashes = config.accepted_key_hashes
    quota_table = config.key_quota_table()
    quotas = KeyQuotas(quota_table, config.key_max_requests_in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="tokenbridge teacher service",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.service = service

    async def authorise(request: Request) -> str | None:
        """The hash of the caller's valid key (``None`` when the service has no keys)."""
        if not key_hashes:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError("this route needs an API key: send 'Authorization: Bearer KEY'")
        digest = hash_api_key(key.strip())
        if not any(hmac.compare_digest(digest, known) for known in key_hashes):
            raise ForbiddenError("the API key is not valid")
        request.scope["state"]["key_id"] = key_id(digest)
        return digest

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            request.state.key_hash = await authorise(request)
            return await handler(request)

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    # -- error mapping: the one place errors become HTTP -----------------------------------

    def error_response(request: Request, error: ServiceError) -> Response:
        body: responses.ErrorBody = {"error": {"code": error.code, "message": error.message}}
        try:
            encoding = _response_encoding(request)
        except ServiceError:
            encoding = JSON
        if isinstance(error, QuotaExceededError):
            service.metrics.quota_refusals.labels(request.scope["state"].get("key_id", "")).inc()
        elif error.status == 429:
            service.metrics.rejected.labels(request.scope["state"].get("teacher", "")).inc()
        return Response(
            pack(body, encoding), status_code=error.status, media_type=encoding,
            headers=error.headers,
        )  # fmt: skip

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, error: ServiceError) -> Response:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, error: RequestValidationError) -> Response:
        return error_response(request, UnprocessableError(f"invalid request: {error.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException) -> Response:
        service_error = ServiceError(str(error.detail))
        service_error.status = error.status_code
        service_error.code = _http_code(error.status_code)
        response = error_response(request, service_error)
        if error.headers:  # a 405's ``Allow`` (RFC 9110 asks for it)
            response.headers.update(error.headers)
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        request_id = request.scope.get("state", {}).get("request_id", "?")
        logger.exception("unexpected error in request %s", request_id)
        return JSONResponse(_internal_error_body(request_id), status_code=500)

    # -- routes ---------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness (no key needed): 200 while the process can serve or get back to serving
        (an engine restart included); 503 once the service gave up on every teacher."""
        if service.state == "failed":
            failed: responses.Health = {"status": "failed", "state": "failed"}
            return JSONResponse(failed, status_code=503)
        alive: responses.Health = {"status": "alive", "state": service.state}
        return JSONResponse(alive)

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
        teachers = service.teacher_readiness()
        asked = request.query_params.get("teacher")
        if asked is not None:
            ready, state = service.teacher(asked).readiness()
        else:
            ready, state = service.readiness()
        body: responses.Readiness = {
            "ready": ready,
            "state": state,
            "teachers": {name: {"ready": r, "state": st} for name, (r, st) in teachers.items()},
            "unready": [name for name, (r, _) in teachers.items() if not r],
        }
        return JSONResponse(
            body, status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "2"},
        )  # fmt: skip

    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def info(request: Request) -> Response:
        """Teacher model, engine, versions, vocabulary, max K, limits, log-prob semantics, and the
        caller's own quota."""
        described = service.info()
        key_hash = request.state.key_hash
        described["limits"]["key_tokens_per_minute"] = config.key_tokens_per_minute
        described["limits"]["key_max_requests_in_flight"] = config.key_max_requests_in_flight
        if key_hash is not None:
            balance = quotas.balance(key_hash)
            described["quota"] = {
                "key_id": key_id(key_hash),
                "tokens_per_minute": quota_table.get(key_hash, 0),
                "tokens_left": None if balance is None else max(0, int(balance)),
                "max_requests_in_flight": config.key_max_requests_in_flight,
            }
        return _respond(request, described)

    async def register_tokenizer(request: Request) -> Response:
        """Register a student tokenizer by hub name, path or uploaded ``tokenizer.json``."""
        body = await _parse(request, RegisterTokenizerRequest)
        with quotas.hold(request.state.key_hash):
            entry, created = await service.register(body)
        described = await asyncio.to_thread(service.describe_student, entry)
        registration: responses.Registration = {**described, "created": created}
        return _respond(request, registration, 201 if created else 200)

    async def list_tokenizers(request: Request) -> Response:
        """Every registered student tokenizer."""
        listed: responses.StudentList = {
            "tokenizers": [e.summary() for e in service.registry.list()]
        }
        return _respond(request, listed)

    async def get_tokenizer(request: Request) -> Response:
        """One registration with its vocabulary overlap and 1:1 share on a probe text."""
        entry = service.registry.get(request.path_params["student_id"])
        return _respond(request, await asyncio.to_thread(service.describe_student, entry))

    async def delete_tokenizer(request: Request) -> Response:
        """Remove a registration."""
        entry = await asyncio.to_thread(service.registry.delete, request.path_params["student_id"])
        deleted: responses.Deleted = {"id": entry.id, "deleted": True}
        return _respond(request, deleted)

    def charge(key_hash: str | None, tokens: int, teacher: str) -> None:
        quotas.charge(key_hash, tokens)
        if key_hash is not None:
            service.metrics.key_teacher_tokens.labels(key_id(key_hash), teacher).inc(tokens)

    def route_to_teacher(request: Request, name: str | None) -> str:
        """The name of the teacher a request asks for (404 for an unknown one), noted for the
        request's metrics and log line."""
        teacher = service.teacher(name).name
        request.scope["state"]["teacher"] = teacher
        return teacher

    async def score(request: Request) -> Response:
        """Teacher log-probs and sparse distributions over the student's vocabulary."""
        body = await _parse(request, ScoreRequest)
        teacher = route_to_teacher(request, body.teacher)
        key_hash = request.state.key_hash
        with quotas.hold(key_hash):
            result = await _until_disconnect(request, service.score(body), config.request_timeout_s)
        charge(key_hash, result["usage"]["teacher_tokens"], teacher)
        encode_started = time.perf_counter()
        response = _respond(request, result)
        service.metrics.stage_seconds.labels("encode", teacher).observe(
            time.perf_counter() - encode_started
        )
        return response

    async def generate(request: Request) -> Response:
        """Teacher samples for prompts (the SFT baseline's data)."""
        body = await _parse(request, GenerateRequest)
        teacher = route_to_teacher(request, body.teacher)
        key_hash = request.state.key_hash
        with quotas.hold(key_hash):
            result = await _until_disconnect(
                request, service.generate(body), config.request_timeout_s
            )
        charge(key_hash, result["usage"]["teacher_tokens"], teacher)
        return _respond(request, result)

    routes: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("GET", "/readyz", readyz),
        ("GET", "/metrics", metrics),
        ("GET", "/v1/info", info),
        ("POST", "/v1/tokenizers", register_tokenizer),
        ("GET", "/v1/tokenizers", list_tokenizers),
        ("GET", "/v1/tokenizers/{student_id}", get_tokenizer),
        ("DELETE", "/v1/tokenizers/{student_id}", delete_tokenizer),
        ("POST", "/v1/score", score),
        ("POST", "/v1/generate", generate),
    ]
    for method, path, handler in routes:
        app.add_api_route(
            path,
            guarded(handler),
            methods=[method],
            response_class=Response,
            openapi_extra=openapi.operation(method, path),
        )
    own = [t.config for t in service.teachers.values()]
    openapi.install(
        app,
        {
            # Bodies are checked against the teacher they name: the schema takes the largest.
            "max_top_k": max(c.max_top_k for c in own),
            "max_sequences": config.max_sequences,
            "max_generate_tokens": max(c.max_generate_tokens for c in own),
        },
    )

    app.add_middleware(_CatchPanics)
    app.add_middleware(_Observe, service=service)
    return app
