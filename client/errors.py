"""The closed error hierarchy of the teacher client.

``TeacherClientError``
  ``TeacherUnavailableError``  no replica could serve the request: connections refused or timed
                               out, 503/429 until the retries ran out, or a connection lost
                               mid-request (never resent: the teacher may still be working on it)
  ``TeacherRequestError``      the service refused the request itself (a 4xx other than 429, or a
                               5xx other than 503): carries its status, code and message; never
                               retried, since sending the same request again gets the same answer
  ``TeacherConfigError``       a start-up check failed: ``top_k`` above the service's
                               ``max_top_k``, the student tokenizer refused, replicas that serve
                               different teachers, ``/v1/info`` unreadable or the key refused
    ``UnknownTeacherError``    the teacher name asked for is not one the service hosts (or the
                               service hosts several and none is the default); names those it has
  ``TeacherProtocolError``     a success response that cannot be decoded or does not fit the
                               request (another service version, a proxy answering instead)

Everything the client raises because of the service or the network is one of these. Arguments
that are wrong before anything is sent (a sequence without ``completion_ids``, a tokenizer object
of an unknown kind) raise ``ValueError``/``TypeError`` as usual in Python; using a client before
``start()`` raises ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "TeacherClientError",
    "TeacherConfigError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "UnknownTeacherError",
]


class TeacherClientError(Exception):
    """Base of every error the teacher client raises about the service or the network."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The replica the error is about, when it is about one.
        self.url = url


class TeacherUnavailableError(TeacherClientError):
    """No replica served the request: the retries ran out, or the connection broke mid-request.

    ``attempts`` is how many HTTP attempts were made; ``failures`` lists what went wrong with the
    last of them, newest last. A trainer may wait and call again: nothing here says the request
    itself is wrong.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        attempts: int = 0,
        failures: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, url=url)
        self.attempts = attempts
        self.failures = failures


class TeacherRequestError(TeacherClientError):
    """The service answered an error that retrying cannot fix (422, 413, 404, 401, 504, ...).

    ``status`` is the HTTP status, ``code`` the service's machine-readable code
    (``unprocessable``, ``payload_too_large``, ``not_found``...), ``message`` its explanation,
    which names the limit or the fix.
    """

    def __init__(self, status: int, code: str, message: str, *, url: str | None = None) -> None:
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status} ({code}){where}: {message}", url=url)
        self.status = status
        self.code = code
        # ``message`` is the service's own text; ``str(error)`` adds the status and replica.
        self.message = message

    @property
    def unknown_teacher(self) -> bool:
        """Whether the service does not host the teacher the request named."""
        return self.status == 404 and self.code == "unknown_teacher"

    @property
    def student_not_registered(self) -> bool:
        """Whether the service no longer knows the student tokenizer (e.g. a fresh data dir)."""
        return self.status == 404 and "no student tokenizer" in self.message


class TeacherConfigError(TeacherClientError):
    """A start-up check failed; the message says which setting to change and to what."""


class TeacherProtocolError(TeacherClientError):
    """A success response that is not a readable answer to the request that was sent."""


class UnknownTeacherError(TeacherConfigError):
    """The service does not host the teacher asked for (``name``; ``None``: its default, when it
    has none). ``available`` lists the teachers it does host (empty: a service that predates
    named teachers, whose one teacher has no name)."""

    def __init__(
        self, message: str, *, name: str | None, available: tuple[str, ...], url: str | None = None
    ) -> None:
        super().__init__(message, url=url)
        self.name = name
        self.available = available
