"""HTTP plumbing the routes share: body encodings, parsing and answering, API keys and quotas,
the per-request deadline. Nothing here knows a route; ``routes.py`` composes these.

Bodies are msgpack by default (``application/msgpack``) and JSON when the request says so; the
answer's encoding follows ``Accept`` when it names one of the two, else the request body's, else
msgpack.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import http
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from tokenbridge.service.completions import is_face_path
from tokenbridge.service.config import ServiceConfig, hash_api_key
from tokenbridge.service.core import TeacherService
from tokenbridge.service.errors import (
    BadRequestError,
    DeadlineExceededError,
    ForbiddenError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from tokenbridge.service.quotas import KeyQuotas, key_id
from tokenbridge.service.teacher import Teacher
from tokenbridge.shared import responses
from tokenbridge.shared.codec import JSON, MSGPACK, MSGPACK_TYPES, body_encoding, pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import FieldValueError

__all__ = [
    "KeyGate",
    "authorise",
    "gate_of",
    "http_code",
    "parse",
    "respond",
    "response_encoding",
    "service_of",
    "teacher_for",
    "until_disconnect",
]

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


def service_of(request: Request) -> TeacherService:
    """The service object the app was built around."""
    service: TeacherService = request.app.state.service
    return service


def gate_of(request: Request) -> KeyGate:
    """The app's API-key checks and per-key quotas."""
    gate: KeyGate = request.app.state.gate
    return gate


# -- encodings -------------------------------------------------------------------------------


def request_encoding(request: Request) -> str:
    """The request body's encoding (415 for a content type that is neither)."""
    header = request.headers.get("content-type")
    encoding = body_encoding(header)
    if encoding is None:
        raise UnsupportedMediaTypeError(
            f"content type {header!r} is not supported; send application/msgpack or "
            "application/json"
        )
    return encoding


def response_encoding(request: Request) -> str:
    """The answer's encoding: what ``Accept`` names, else the body's, else msgpack (JSON on the
    vLLM face, whose clients read JSON without asking for it)."""
    accept = request.headers.get("accept", "").lower()
    wants_json = JSON in accept
    wants_msgpack = any(t in accept for t in MSGPACK_TYPES)
    if wants_json != wants_msgpack:
        return JSON if wants_json else MSGPACK
    header = request.headers.get("content-type")
    default = JSON if is_face_path(request.url.path) else MSGPACK
    return (body_encoding(header) if header else None) or default


def respond(
    request: Request,
    value: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """``value`` encoded as the caller asked, its size counted."""
    encoding = response_encoding(request)
    body = pack(value, encoding)
    service_of(request).metrics.payload_bytes.labels("out").observe(len(body))
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


async def parse(request: Request, model: type[ModelT]) -> ModelT:
    """The request body, read under ``max_body_bytes``, decoded and validated as ``model``."""
    service = service_of(request)
    encoding = request_encoding(request)
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
        raise UnprocessableError(_validation_message(error), _faulty_field(error)) from None


def _faulty_field(error: ValidationError) -> str | None:
    """The top-level field the first validation error is about, where it names one."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldValueError):
        return cause.field
    return str(first["loc"][0]) if first["loc"] else None


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:10]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def http_code(status: int) -> str:
    """The error ``code`` of a routing refusal: ``not_found``, ``method_not_allowed``..."""
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


# -- callers: keys, quotas, teachers ---------------------------------------------------------


class KeyGate:
    """Who may call (Bearer keys, known by their hashes) and how much (per-key quotas)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.key_hashes = config.accepted_key_hashes
        self.quota_table = config.key_quota_table()
        self.quotas = KeyQuotas(self.quota_table, config.key_max_requests_in_flight)
        self.tokens_per_minute = config.key_tokens_per_minute

    def check(self, request: Request) -> str | None:
        """The hash of the caller's valid key (``None`` when the service has no keys); 401
        without a key, 403 with a wrong one."""
        if not self.key_hashes:
            return None
        key = _presented_key(request.headers.get("authorization", ""))
        if not key:
            raise UnauthorizedError("this route needs an API key: send 'Authorization: Bearer KEY'")
        digest = hash_api_key(key)
        if not any(hmac.compare_digest(digest, known) for known in self.key_hashes):
            raise ForbiddenError("the API key is not valid")
        request.scope["state"]["key_id"] = key_id(digest)
        return digest

    @contextmanager
    def hold(self, request: Request) -> Iterator[None]:
        """Count one request of the caller in flight for the block (429 past its quota)."""
        with self.quotas.hold(request.state.key_hash):
            yield

    def charge(self, request: Request, tokens: int, teacher: Teacher) -> None:
        """Take the teacher tokens a request used from its caller's quota, and count them."""
        key_hash = request.state.key_hash
        self.quotas.charge(key_hash, tokens)
        if key_hash is not None:
            service_of(request).metrics.key_teacher_tokens.labels(
                key_id(key_hash), teacher.name
            ).inc(tokens)

    def quota(self, request: Request) -> responses.KeyQuota | None:
        """The caller's own quota, for ``/v1/info`` (``None`` when the service has no keys)."""
        key_hash = request.state.key_hash
        if key_hash is None:
            return None
        balance = self.quotas.balance(key_hash)
        return {
            "key_id": key_id(key_hash),
            "tokens_per_minute": self.quota_table.get(key_hash, 0),
            "tokens_left": None if balance is None else max(0, int(balance)),
            "max_requests_in_flight": self.quotas.max_requests_in_flight,
        }


def _presented_key(header: str) -> str:
    """The key of an ``Authorization`` header: ``Bearer KEY``, or Basic credentials whose
    password is the key (what a client sends for a URL ``http://user:KEY@host/...``: TRL's
    ``VLLMClient`` can send no other header); empty when there is none."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2].strip()
    return ""


async def authorise(request: Request) -> None:
    """The routers' dependency: check the caller's key, noting its hash on the request."""
    request.state.key_hash = gate_of(request).check(request)


def teacher_for(request: Request, name: str | None) -> Teacher:
    """The teacher a request names (404 for an unknown one, ``None``: the default), noted for
    the request's metrics and log line."""
    teacher = service_of(request).teacher(name)
    request.scope["state"]["teacher"] = teacher.name
    return teacher


async def until_disconnect(request: Request, work: Awaitable[T], timeout_s: float) -> T:
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
