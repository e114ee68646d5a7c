"""Bodies on the wire: msgpack with typed arrays (the default) or JSON.

An array travels as a map ``{"dtype": "<f4", "shape": [n, k], "data": <raw little-endian bytes>}``
in msgpack, never as pickle; in JSON as nested lists, with non-finite floats as ``null``. Integer
arrays travel in the narrowest little-endian integer type that holds their values (readers widen),
so ids of a 32k vocabulary cost two bytes. Decoders check every declared dtype and size and raise
``CodecError`` with the reason; they never execute anything the body carries.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgpack
import numpy as np

from tokenbridge.shared.errors import CodecError, one_line_reason

__all__ = [
    "ALLOWED_DTYPES",
    "JSON",
    "MSGPACK",
    "MSGPACK_TYPES",
    "body_encoding",
    "decode_array",
    "encode_array",
    "narrow_ints",
    "pack",
    "to_json_ready",
    "unpack",
]

MSGPACK = "application/msgpack"
JSON = "application/json"

ALLOWED_DTYPES = frozenset(
    {"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"}
)
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
#: The names msgpack goes by; there is no registered one, so peers send any of these.
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


def body_encoding(content_type_header: str | None) -> str | None:
    """The codec for a body with this ``Content-Type`` header: ``JSON`` for JSON and any
    ``+json`` type, ``MSGPACK`` for msgpack's names or no type at all, ``None`` for anything else
    (parameters such as ``; charset=utf-8`` are ignored, case does not matter)."""
    kind = (content_type_header or "").split(";")[0].strip().lower()
    if kind == JSON or kind.endswith("+json"):
        return JSON
    if not kind or kind in MSGPACK_TYPES:
        return MSGPACK
    return None


_MAX_DIMS = 4


def narrow_ints(array: np.ndarray) -> np.ndarray:
    """``array`` in the narrowest signed integer type holding its values (others unchanged)."""
    if array.dtype.kind != "i" or array.size == 0:
        return array
    low, high = int(array.min()), int(array.max())
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype)
    return array


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """The msgpack form of ``array``: dtype, shape and raw little-endian bytes."""
    array = narrow_ints(np.asarray(array))
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    dtype = little.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise CodecError(
            f"arrays of dtype {dtype} cannot travel; use one of {sorted(ALLOWED_DTYPES)}"
        )
    return {
        "dtype": dtype,
        "shape": list(little.shape),
        "data": np.ascontiguousarray(little).tobytes(),
    }


def decode_array(value: dict[str, Any]) -> np.ndarray:
    """The array a typed-array map describes; ``CodecError`` if dtype, shape or size is wrong."""
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"array dtype must be one of {sorted(ALLOWED_DTYPES)}; got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise CodecError(f"array shape must be a list of at most {_MAX_DIMS} sizes; got {shape!r}")
    if not isinstance(data, bytes | bytearray):
        raise CodecError("array data must be raw bytes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise CodecError(
            f"array of dtype {dtype} and shape {shape} needs {expected} bytes; got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as error:  # e.g. a zero-size shape whose sides numpy cannot index
        raise CodecError(f"array shape {shape} is not usable: {error}") from None


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _object_hook(value: dict[Any, Any]) -> Any:
    if len(value) == 3 and set(value) == _ARRAY_KEYS and isinstance(value["data"], bytes):
        return decode_array(value)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension types are not part of the protocol (got type {code})")


def to_json_ready(value: Any) -> Any:
    """``value`` with arrays turned into lists and non-finite floats into ``None``."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            as_float = value.astype(np.float64)
            listed = as_float.tolist()
            if np.isfinite(as_float).all():
                return listed
            return _nullify(listed)
        return value.tolist()
    if isinstance(value, dict):
        return {key: to_json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return to_json_ready(value.item())
    return value


def _nullify(value: Any) -> Any:
    if isinstance(value, list):
        return [_nullify(item) for item in value]
    return value if math.isfinite(value) else None


def pack(value: Any, content_type: str = MSGPACK) -> bytes:
    """Serialise ``value`` (dicts, lists, scalars and numpy arrays) as msgpack or JSON."""
    try:
        if content_type == JSON:
            ready = to_json_ready(value)
            return json.dumps(ready, separators=(",", ":"), allow_nan=False).encode()
        return msgpack.packb(value, default=_default, use_bin_type=True)
    except (TypeError, ValueError) as error:
        raise CodecError(f"cannot encode the value: {error}") from None


# An escape in U+D800..U+DFFF: the only way a lone surrogate gets into a JSON string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(value: Any) -> None:
    """``CodecError`` when a string in ``value`` holds a lone surrogate (no UTF-8 spelling)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise CodecError(
                    "body is not valid JSON: a string holds a lone UTF-16 surrogate escape "
                    f"({item[:40]!r}); send valid Unicode"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def unpack(body: bytes, content_type: str = MSGPACK) -> Any:
    """Parse a msgpack or JSON body (typed arrays become numpy); ``CodecError`` if malformed.

    Strings are valid Unicode either way: msgpack's must be UTF-8, and a JSON string escaping a
    lone surrogate (``"\\ud800"``) is refused.
    """
    if content_type == JSON:
        try:
            value = json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as error:
            raise CodecError(f"body is not valid JSON: {one_line_reason(error)}") from None
        if isinstance(body, str) or _SURROGATE_ESCAPE.search(body):
            _check_text(value)
        return value
    try:
        return msgpack.unpackb(
            body, raw=False, object_hook=_object_hook, strict_map_key=True, ext_hook=_refuse_ext
        )
    except CodecError:
        raise
    except (msgpack.StackError, RecursionError):  # StackError is a ValueError: caught first
        raise CodecError("body is not valid msgpack: it is nested too deeply") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise CodecError(f"body is not valid msgpack: {one_line_reason(error)}") from None
