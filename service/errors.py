"""The service's closed error hierarchy. ``app`` maps it to HTTP in one place.

Every error carries its HTTP status, a stable machine-readable ``code`` and a message that says
what was wrong and what to do; 500s never reach a client with internals (the app logs them and
answers a generic message).
"""

from __future__ import annotations

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
]


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

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
