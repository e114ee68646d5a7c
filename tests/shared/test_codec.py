"""The wire codec (``shared/codec.py``): typed arrays in msgpack, JSON with nulls, strict decoding.

Round trips of every allowed dtype, integer narrowing, little-endian raw data, the JSON form, and
that every malformed body is refused with ``CodecError`` and never another exception type.
"""

from __future__ import annotations

import contextlib
import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tokenbridge.shared.codec import (
    ALLOWED_DTYPES,
    JSON,
    MSGPACK,
    body_encoding,
    decode_array,
    encode_array,
    narrow_ints,
    pack,
    unpack,
)
from tokenbridge.shared.errors import CodecError

SHAPES = array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
SIGNED = (np.int8, np.int16, np.int32, np.int64)


def _with_byte_order(dtype: str, order: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder(order) if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)


# Every allowed dtype, also in big-endian form (the encoder must turn it little-endian).
ANY_DTYPE = st.builds(
    _with_byte_order, st.sampled_from(sorted(ALLOWED_DTYPES)), st.sampled_from(["<", ">"])
)
ANY_ARRAY = ANY_DTYPE.flatmap(lambda dtype: arrays(dtype, SHAPES))


def narrowest_signed(low: int, high: int) -> np.dtype:
    for dtype in SIGNED:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise AssertionError("outside int64")


def assert_same_array(decoded: np.ndarray, original: np.ndarray) -> None:
    """``decoded`` is what ``original`` must come back as: same shape and values, dtype widened
    back only by the reader, so integers may be narrower and everything else is bit-identical."""
    assert isinstance(decoded, np.ndarray)
    assert decoded.shape == original.shape
    if original.dtype.kind == "i":
        if original.size:
            expected = narrowest_signed(int(original.min()), int(original.max()))
            assert decoded.dtype == expected.newbyteorder("<")
        np.testing.assert_array_equal(decoded.astype(np.int64), original.astype(np.int64))
    else:
        little = original.dtype.newbyteorder("<") if original.dtype.itemsize > 1 else original.dtype
        assert decoded.dtype.str == little.str
        # Bytes, not values: NaN payloads and -0.0 survive too.
        assert decoded.tobytes() == original.astype(little).tobytes()


# --- msgpack round trips -------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(ANY_ARRAY)
def test_every_allowed_dtype_round_trips_through_msgpack(array):
    assert_same_array(unpack(pack(array)), array)


@settings(max_examples=60, deadline=None)
@given(ANY_ARRAY, ANY_ARRAY, st.integers(-(2**63), 2**64 - 1), st.text(max_size=5))
def test_arrays_nested_in_dicts_and_lists_round_trip(first, second, number, text):
    value = {"a": [first, {"b": second, "n": number}], "t": text, "empty": {}}
    decoded = unpack(pack(value, MSGPACK))
    assert set(decoded) == {"a", "t", "empty"}
    assert decoded["t"] == text and decoded["empty"] == {}
    assert decoded["a"][1]["n"] == number
    assert_same_array(decoded["a"][0], first)
    assert_same_array(decoded["a"][1]["b"], second)


def test_numpy_scalars_travel_as_plain_numbers():
    decoded = unpack(pack({"i": np.int64(7), "f": np.float32(0.5), "b": np.bool_(True)}))
    assert decoded == {"i": 7, "f": 0.5, "b": True}
    assert type(decoded["i"]) is int and type(decoded["f"]) is float


def test_zero_dimensional_and_empty_arrays_keep_their_shape():
    for array in (np.array(1.5, np.float32), np.zeros((0, 3), np.float16), np.zeros((2, 0), "<i4")):
        decoded = unpack(pack(array))
        assert decoded.shape == array.shape
        assert decoded.dtype.kind == array.dtype.kind


# --- integer narrowing ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SIGNED).flatmap(lambda dtype: arrays(dtype, SHAPES)))
def test_narrow_ints_picks_the_narrowest_signed_type_and_keeps_values(array):
    narrowed = narrow_ints(array)
    np.testing.assert_array_equal(narrowed.astype(np.int64), array.astype(np.int64))
    if array.size:
        assert narrowed.dtype == narrowest_signed(int(array.min()), int(array.max()))
    else:
        assert narrowed.dtype == array.dtype


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 127, -128], np.int8),
        ([128], np.int16),
        ([-129], np.int16),
        ([32_767, -32_768], np.int16),
        ([32_768], np.int32),
        ([2**31 - 1, -(2**31)], np.int32),
        ([2**31], np.int64),
        ([-(2**31) - 1], np.int64),
    ],
)
def test_narrow_ints_boundaries(values, expected):
    narrowed = narrow_ints(np.array(values, dtype=np.int64))
    assert narrowed.dtype == expected
    assert narrowed.tolist() == values


def test_int64_extremes_stay_int64_through_the_wire():
    info = np.iinfo(np.int64)
    array = np.array([info.min, 0, info.max], dtype=np.int64)
    encoded = encode_array(array)
    assert encoded["dtype"] == "<i8"
    decoded = unpack(pack(array))
    assert decoded.dtype == np.dtype("<i8")
    assert decoded.tolist() == [info.min, 0, info.max]


def test_unsigned_and_float_arrays_are_not_narrowed():
    for array in (np.array([1, 2], np.uint32), np.array([1.0], np.float64)):
        assert narrow_ints(array) is array
    assert encode_array(np.array([1, 2], np.uint64))["dtype"] == "<u8"


def test_small_ids_travel_in_two_bytes():
    ids = np.arange(30_000, 32_000, dtype=np.int64)
    encoded = encode_array(ids)
    assert encoded["dtype"] == "<i2"
    assert len(encoded["data"]) == 2 * ids.size


# --- byte order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<f4", ">f4", ">f8", ">f2", ">u4", ">i8", "<i8"])
def test_raw_data_is_little_endian(dtype):
    values = [1.5, -2.25, 1000.0] if "f" in dtype else [1, 2**16 + 3, 7]
    if "i8" in dtype:
        values = [2**40, -(2**40), 5]  # not narrowable below int64
    array = np.array(values, dtype=dtype)
    body = pack({"x": array})
    raw = msgpack.unpackb(body, raw=False)["x"]  # the map as it travels, not decoded
    little = np.dtype(dtype).newbyteorder("<")
    assert raw["dtype"] == little.str
    assert raw["shape"] == [3]
    assert raw["data"] == array.astype(little).tobytes()
    np.testing.assert_array_equal(unpack(body)["x"], array)


# --- JSON ----------------------------------------------------------------------------------------


def test_json_turns_arrays_into_lists():
    value = {
        "ids": np.array([[1, 2], [3, 4]], np.int32),
        "flags": np.array([True, False]),
        "nested": [np.array([0.5], np.float32)],
    }
    assert json.loads(pack(value, JSON)) == {
        "ids": [[1, 2], [3, 4]],
        "flags": [True, False],
        "nested": [[0.5]],
    }


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["<f2", "<f4", "<f8", ">f4"]).flatmap(
        lambda dtype: arrays(np.dtype(dtype), SHAPES)
    )
)
def test_json_floats_keep_their_float64_value_and_non_finite_become_null(array):
    decoded = unpack(pack({"a": array}, JSON), JSON)["a"]
    flat_in = array.astype(np.float64).reshape(-1).tolist()
    flat_out = np.asarray(decoded, dtype=object).reshape(-1).tolist()
    assert len(flat_out) == len(flat_in)
    for got, want in zip(flat_out, flat_in, strict=True):
        if math.isfinite(want):
            assert got == want and type(got) is float
        else:
            assert got is None


def test_float16_values_survive_json_exactly():
    halves = np.array([0.1, 1 / 3, 65504.0, 6e-8, -2.5], dtype=np.float16)
    decoded = json.loads(pack(halves, JSON))
    assert decoded == [float(h) for h in halves.astype(np.float64)]
    np.testing.assert_array_equal(np.array(decoded, dtype=np.float16), halves)


def test_json_non_finite_scalars_and_numpy_scalars_become_null():
    value = {
        "a": math.nan,
        "b": [math.inf, -math.inf, 1.0],
        "c": np.float32(np.nan),
        "d": np.float64(-np.inf),
        "e": np.array(np.inf),
        "f": np.array([[np.nan, 2.0]]),
    }
    assert json.loads(pack(value, JSON)) == {
        "a": None,
        "b": [None, None, 1.0],
        "c": None,
        "d": None,
        "e": None,
        "f": [[None, 2.0]],
    }


@pytest.mark.parametrize(
    "body", [b"{", b"[1,]", b"\xff\xfe\xfa", b"", b"{'a': 1}", b"[" * 100_000, b"tru"]
)
def test_invalid_json_raises_codec_error(body):
    with pytest.raises(CodecError, match="not valid JSON"):
        unpack(body, JSON)


# --- refusals when encoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(2, np.complex128),
        np.zeros(2, np.complex64),
        np.array(["a"], dtype=object),
        np.array(["ab"]),
        np.zeros(1, "datetime64[s]"),
        np.zeros(1, np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else np.zeros(1, "V4"),
    ],
)
def test_pack_refuses_unsupported_arrays(array):
    with pytest.raises(CodecError, match="cannot travel"):
        pack({"x": array})
    with pytest.raises(CodecError):
        encode_array(array)


def test_pack_json_refuses_unsupported_arrays_with_codec_error():
    with pytest.raises(CodecError):
        pack({"x": np.zeros(2, np.complex128)}, JSON)


# --- refusals when decoding ----------------------------------------------------------------------


def typed_map(**fields) -> bytes:
    """A typed-array map on the wire, built by hand (so it may lie)."""
    body = {"dtype": "<f4", "shape": [2], "data": b"\x00" * 8}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


def test_a_hand_built_typed_map_decodes():
    array = unpack(typed_map(dtype="<i2", shape=[2, 1], data=b"\x01\x00\xff\xff"))
    assert array.dtype == np.dtype("<i2") and array.tolist() == [[1], [-1]]


@pytest.mark.parametrize(
    "body", [b"\xc1", b"\x91", b"\x92\x01", b"\xda\x00\x10abc", b"\x81\xc0\x01", b"\xdf\xff\xff"]
)
def test_garbage_bytes_raise_codec_error(body):
    with pytest.raises(CodecError, match="not valid msgpack"):
        unpack(body)


def test_trailing_bytes_raise_codec_error():
    with pytest.raises(CodecError):
        unpack(pack({"a": 1}) + b"\x00")


def test_every_truncation_of_a_body_raises_codec_error():
    body = pack({"logprobs": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": [1, 2, 3]})
    for cut in range(len(body)):
        with pytest.raises(CodecError):
            unpack(body[:cut])


@pytest.mark.parametrize(
    ("shape", "data_len"),
    [([2], 7), ([2], 9), ([2, 3], 8), ([], 0), ([0], 4), ([3, 0, 2], 4)],
)
def test_data_length_must_match_shape_times_itemsize(shape, data_len):
    with pytest.raises(CodecError, match="needs"):
        unpack(typed_map(shape=shape, data=b"\x00" * data_len))


@pytest.mark.parametrize(
    "dtype", ["|O", "<c16", "<c8", "object", ">f4", ">i4", "<f16", "f4", "<U1", "|V4", "", "<M8[s]"]
)
def test_unknown_dtype_strings_raise_codec_error(dtype):
    with pytest.raises(CodecError, match="dtype"):
        unpack(typed_map(dtype=dtype))


@pytest.mark.parametrize("dtype", [None, 4, b"<f4", ["<f4"], {"a": 1}])
def test_non_string_dtypes_raise_codec_error(dtype):
    with pytest.raises(CodecError, match="dtype"):
        unpack(typed_map(dtype=dtype))


@pytest.mark.parametrize(
    "shape",
    [
        [-2],
        [2, -1],
        [2.0],
        ["2"],
        [True, True],
        [False],
        [None],
        [[2]],
        2,
        "2",
        None,
        {"n": 2},
        [1, 1, 1, 1, 2],  # too many dims, right size
        [1] * 40,
    ],
)
def test_bad_shapes_raise_codec_error(shape):
    with pytest.raises(CodecError, match="shape"):
        unpack(typed_map(shape=shape))


def test_four_dims_are_allowed():
    array = unpack(typed_map(shape=[1, 2, 1, 1]))
    assert array.shape == (1, 2, 1, 1)


def test_shapes_beyond_numpy_limits_raise_codec_error_through_unpack():
    for shape in ([2**40, 2**40, 0], [2**64 - 1, 0], [0, 2**63]):
        with pytest.raises(CodecError):
            unpack(typed_map(shape=shape, data=b""))


def test_decode_array_raises_codec_error_for_shapes_beyond_numpy_limits():
    with pytest.raises(CodecError):
        decode_array({"dtype": "<f4", "shape": [2**40, 2**40, 0], "data": b""})


@pytest.mark.parametrize("data", ["\x00" * 8, [0] * 8, None, 8, memoryview(b"\x00" * 8)])
def test_decode_array_refuses_non_bytes_data(data):
    with pytest.raises(CodecError, match="raw bytes"):
        decode_array({"dtype": "<f4", "shape": [2], "data": data})


def test_decode_array_accepts_bytearray():
    assert decode_array(
        {"dtype": "|u1", "shape": [2], "data": bytearray(b"\x01\x02")}
    ).tolist() == [
        1,
        2,
    ]


@pytest.mark.parametrize("data", ["\x00" * 8, [0, 0], None, 8, {"x": 1}])
def test_a_map_with_array_keys_but_non_bytes_data_stays_a_plain_dict(data):
    decoded = unpack(typed_map(data=data))
    assert decoded == {"dtype": "<f4", "shape": [2], "data": data}
    assert type(decoded) is dict


def test_a_map_with_extra_keys_stays_a_plain_dict():
    body = {"dtype": "<f4", "shape": [2], "data": b"\x00" * 8, "extra": 1}
    decoded = unpack(msgpack.packb(body, use_bin_type=True))
    assert decoded == body


def test_a_lying_array_nested_deep_inside_still_raises_codec_error():
    bad = {"dtype": "<f8", "shape": [3], "data": b"\x00" * 8}
    body = msgpack.packb({"a": [1, {"b": [bad]}]}, use_bin_type=True)
    with pytest.raises(CodecError, match="needs 24 bytes"):
        unpack(body)


def test_non_string_map_keys_raise_codec_error():
    with pytest.raises(CodecError):
        unpack(msgpack.packb({1: "a"}))


# --- fuzzing -------------------------------------------------------------------------------------


def decodes_or_refuses(body: bytes) -> None:
    with contextlib.suppress(CodecError):
        unpack(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_codec_error(body):
    decodes_or_refuses(body)


VALID_BODY = pack(
    {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ids": np.array([1, 300, 70_000]),
        "t": "héllo",
        "nested": [{"m": np.zeros((1, 1, 1, 2), np.float16)}],
    }
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID_BODY) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    st.integers(0, len(VALID_BODY)),
)
def test_mutated_valid_bodies_decode_or_raise_codec_error(edits, cut):
    body = bytearray(VALID_BODY)
    for position, byte in edits:
        body[position] = byte
    decodes_or_refuses(bytes(body[: max(cut, 1)]))
    decodes_or_refuses(bytes(body))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_as_json_decode_or_raise_codec_error(body):
    with contextlib.suppress(CodecError):
        unpack(body, JSON)


def test_json_constants_that_are_not_json_are_refused():
    for body in (b"NaN", b"[1, Infinity]", b'{"x": -Infinity}'):
        with pytest.raises(CodecError, match="not valid JSON"):
            unpack(body, JSON)


def test_msgpack_extension_types_are_refused():
    body = msgpack.packb({"x": msgpack.ExtType(5, b"abc")})
    with pytest.raises(CodecError, match="extension types"):
        unpack(body)


def test_api_keys_stay_out_of_the_config_repr():
    from tokenbridge.service.config import ServiceConfig

    assert "hunter2" not in repr(ServiceConfig(api_keys=("hunter2",)))


def test_reasons_keep_one_line_and_never_the_traceback():
    from tokenbridge.shared.errors import one_line_reason

    error = ValueError("bad token at 3\n  File /opt/site-packages/tokenizers/x.py, line 9")
    assert one_line_reason(error) == "bad token at 3"
    assert one_line_reason(KeyError()) == "KeyError"
    assert one_line_reason(ValueError("x" * 1000), limit=40) == "x" * 40


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, MSGPACK),
        ("", MSGPACK),
        ("application/msgpack", MSGPACK),
        ("Application/X-Msgpack; charset=binary", MSGPACK),
        ("application/vnd.msgpack", MSGPACK),
        ("application/json", JSON),
        ("application/JSON; charset=utf-8", JSON),
        ("application/problem+json", JSON),
        ("text/plain", None),
        ("application/xml", None),
    ],
)
def test_the_body_encoding_is_read_from_the_content_type(header, expected):
    assert body_encoding(header) == expected
