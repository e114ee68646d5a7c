"""The closed error hierarchy of ``tokenbridge.shared``.

``TokenbridgeError``
  ``TokenizerUnsupportedError``  a tokenizer whose tokens cannot be turned into exact bytes
  ``AlignmentError``             two token sequences that do not spell the same bytes
  ``ScoresShapeError``           teacher scores whose shapes do not match the teacher sequence
  ``CodecError``                 a body that is not valid msgpack/JSON or carries a malformed array

Callers (the service's error mapper, the client) catch ``TokenbridgeError`` and map the subclasses;
every message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "CodecError",
    "ScoresShapeError",
    "TokenbridgeError",
    "TokenizerUnsupportedError",
    "one_line_reason",
]


def one_line_reason(error: BaseException, limit: int = 300) -> str:
    """What went wrong, fit for a client's error message: the first line of ``error``'s text
    (its type name when it has none), at most ``limit`` characters, so that tracebacks and paths
    into the installation that a library puts on later lines never reach the client."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


class TokenbridgeError(Exception):
    """Base of every error ``tokenbridge.shared`` raises on purpose."""


class TokenizerUnsupportedError(TokenbridgeError):
    """The tokenizer's pieces do not spell bytes, so no byte-exact mapping is possible."""


class AlignmentError(TokenbridgeError):
    """Two tokenisations that should spell the same bytes do not."""


class ScoresShapeError(TokenbridgeError):
    """Teacher scores do not fit the teacher token sequence they claim to describe."""


class CodecError(TokenbridgeError):
    """A body that cannot be decoded: malformed msgpack or JSON, or a typed array that lies."""
