"""The service's closed error hierarchy. ``app`` maps it to HTTP in one place.

Every error carries its HTTP status, a stable machine-readable ``code`` and a message that says
what was wrong and what to do; 500s never reach a client with internals (the app logs them and
answers a generic message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from tokenbridge.shared.errors import one_line_reason

__all__ = [
    "BadRequestError",
    "DeadlineExceededError",
    "EngineUnavailableError",
    "ForbiddenError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "QuotaExceededError",
    "ServiceError",
    "UnauthorizedError",
    "UnknownTeacherError",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "tokenizer_failures_are_unprocessable",
]


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field at fault, where one is (the vLLM face's errors name it).
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After``, ``WWW-Authenticate``)."""
        return {}


class BadRequestError(ServiceError):
    """The body cannot be decoded."""

    status = 400
    code = "bad_request"


class UnauthorizedError(ServiceError):
    """No API key was presented."""

    status = 401
    code = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        """Tell the client which scheme to use."""
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServiceError):
    """An API key was presented but is not valid."""

    status = 403
    code = "forbidden"


class NotFoundError(ServiceError):
    """A named resource (a student tokenizer) does not exist."""

    status = 404
    code = "not_found"


class UnknownTeacherError(NotFoundError):
    """A request names a teacher this service does not host (the message lists those it does)."""

    code = "unknown_teacher"


class PayloadTooLargeError(ServiceError):
    """The body or the token count exceeds a configured limit (the message names it)."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    """The body is neither msgpack nor JSON."""

    status = 415
    code = "unsupported_media_type"


class UnprocessableError(ServiceError):
    """The body decodes but asks for something invalid (K too large, a bad tokenizer...)."""

    status = 422
    code = "unprocessable"


class OverloadedError(ServiceError):
    """Admission refused: too many tokens in flight. Retry after ``retry_after_s``."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """``Retry-After`` in whole seconds, at least 1."""
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class QuotaExceededError(OverloadedError):
    """The API key has used its per-key quota (tokens a minute or requests in flight)."""

    code = "quota_exceeded"


class NotReadyError(ServiceError):
    """The service is loading, draining or its engine is down."""

    status = 503
    code = "not_ready"

    @property
    def headers(self) -> dict[str, str]:
        """Ask the client to come back shortly."""
        return {"Retry-After": "2"}


class EngineUnavailableError(NotReadyError):
    """The engine failed while serving this request (out of memory, died)."""

    code = "engine_unavailable"


class DeadlineExceededError(ServiceError):
    """The request ran past the per-request deadline and was abandoned."""

    status = 504
    code = "deadline_exceeded"


#: What is never a tokenizer's failure, however it arrives: the interpreter's own exits, a task's
#: cancellation, and running out of memory.
_NEVER_THE_TOKENIZERS = (
    asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError
)  # fmt: skip


@contextlib.contextmanager
def tokenizer_failures_are_unprocessable(
    what: str, log: logging.Logger | None = None
) -> Iterator[None]:
    """Inside, whatever a tokenizer raises is the request's fault: ``UnprocessableError`` (422)
    saying ``what`` and the first line of the reason (``log`` gets the whole traceback).

    ``BaseException``, not ``Exception``: the Rust ``tokenizers`` library reports a panic as
    ``pyo3_runtime.PanicException``, which derives from ``BaseException``, and a strange input or
    an uploaded tokenizer must not take a worker down. Errors the service raised on purpose pass
    through, and so does ``_NEVER_THE_TOKENIZERS``.
    """
    try:
        yield
    except ServiceError:
        raise
    except BaseException as error:
        if isinstance(error, _NEVER_THE_TOKENIZERS):
            raise
        if log is not None:
            log.warning("%s", what, exc_info=True)
        raise UnprocessableError(f"{what}: {one_line_reason(error)}") from None
