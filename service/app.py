"""The HTTP face of the teacher service: the app factory, the one error mapper, middleware.

The routes are in ``routes.py`` (one router per feature, thin), their plumbing (encodings,
keys, quotas, deadlines) in ``http.py``. Every route but ``/healthz`` requires a Bearer key when
keys are configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbridge.service import openapi
from tokenbridge.service.completions import FACE_PREFIX, is_face_path
from tokenbridge.service.config import DEFAULT_TEACHER, NO_TEACHER, ServiceConfig
from tokenbridge.service.core import TeacherService
from tokenbridge.service.engines.base import TeacherEngine
from tokenbridge.service.errors import QuotaExceededError, ServiceError, UnprocessableError
from tokenbridge.service.http import KeyGate, http_code, response_encoding
from tokenbridge.service.routes import ROUTERS
from tokenbridge.shared import responses
from tokenbridge.shared.codec import JSON, pack

__all__ = ["create_app"]

logger = logging.getLogger("tokenbridge.service.http")


# -- error mapping: the one place errors become HTTP -------------------------------------------


def _error_body(request: Request, error: ServiceError) -> Any:
    """The refusal's body: ours, or on the vLLM face vLLM's (its clients read that)."""
    if is_face_path(request.url.path):
        phrase = http.HTTPStatus(error.status).phrase.replace(" ", "")
        face: responses.VllmErrorBody = {
            "error": {
                "message": error.message,
                "type": phrase if phrase.endswith("Error") else phrase + "Error",
                "param": error.param,
                "code": error.status,
            }
        }
        return face
    body: responses.ErrorBody = {"error": {"code": error.code, "message": error.message}}
    return body


def _error_response(request: Request, error: ServiceError) -> Response:
    body = _error_body(request, error)
    try:
        encoding = response_encoding(request)
    except ServiceError:
        encoding = JSON
    metrics = request.app.state.service.metrics
    if isinstance(error, QuotaExceededError):
        metrics.quota_refusals.labels(request.scope["state"].get("key_id", "")).inc()
    elif error.status == 429:
        metrics.rejected.labels(request.scope["state"].get("teacher", "")).inc()
    return Response(
        pack(body, encoding), status_code=error.status, media_type=encoding, headers=error.headers
    )


async def _on_service_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ServiceError)
    return _error_response(request, error)


async def _on_validation(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _error_response(request, UnprocessableError(f"invalid request: {error.errors()}"))


async def _on_http(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    service_error = ServiceError(str(error.detail))
    service_error.status = error.status_code
    service_error.code = http_code(error.status_code)
    response = _error_response(request, service_error)
    if error.headers:  # a 405's ``Allow`` (RFC 9110 asks for it)
        response.headers.update(error.headers)
    return response


async def _on_unexpected(request: Request, error: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id", "?")
    logger.exception("unexpected error in request %s", request_id)
    return JSONResponse(_internal_error_body(request_id), status_code=500)


# -- middleware ------------------------------------------------------------------------------


def _route_label(path: str) -> str:
    if path.startswith("/v1/tokenizers/"):
        return "/v1/tokenizers/{id}"
    if path.startswith(FACE_PREFIX + "/"):
        tail = path.split("/", 4)[4:]
        known_tail = tail and tail[0] in ("health", "v1/models", "v1/completions")
        return f"{FACE_PREFIX}/{{teacher}}/{{student}}/{tail[0] if known_tail else '...'}"
    known = {
        "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/tokenizers", "/v1/score",
        "/v1/generate", "/v1/models", "/v1/completions",
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
    app.state.gate = KeyGate(config)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
    for router in ROUTERS:
        app.include_router(router)
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
