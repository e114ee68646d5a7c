"""Fuzzing the decoders below the routes: ``shared.codec.unpack`` and the request models.

Whatever bytes arrive, ``unpack`` answers a value or ``CodecError``; whatever value it answers,
the request models answer a model or ``ValidationError``. Nothing else may escape (a TypeError or
OverflowError here is a 500 at the route). Valid values round-trip through both encodings.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tokenbridge.shared.codec import JSON, MSGPACK, pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import (
    GenerateRequest,
    Prompt,
    RegisterTokenizerRequest,
    ScoreRequest,
)

from tests.support.fuzz import (
    FIELD_VALUES,
    FUZZ,
    JSON_VALUES,
    LYING_ARRAYS,
    MSGPACK_PLAIN_VALUES,
    MSGPACK_VALUES,
    ODD_TEXT,
    fuzz_settings,
    replaced,
)

pytestmark = pytest.mark.fuzz

MODELS: tuple[type[BaseModel], ...] = (ScoreRequest, GenerateRequest, RegisterTokenizerRequest)


def decodes_or_refuses(body: bytes, encoding: str) -> Any:
    """``unpack(body)``'s value, or ``None`` when it raises ``CodecError`` (anything else fails)."""
    try:
        return unpack(body, encoding)
    except CodecError as error:
        assert str(error).strip(), "a CodecError must say why"
        return None


def validates_or_refuses(model: type[BaseModel], value: Any) -> BaseModel | None:
    """``model.model_validate(value)``, or ``None`` on ``ValidationError`` (nothing else)."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        assert error.errors(), "a ValidationError names its fields"
        return None


# -- the codec ----------------------------------------------------------------------------------


@fuzz_settings(300)
@given(MSGPACK_VALUES)
def test_any_msgpack_value_decodes_or_raises_codec_error(value):
    decodes_or_refuses(msgpack.packb(value, use_bin_type=True), MSGPACK)


@fuzz_settings(200)
@given(LYING_ARRAYS)
def test_a_typed_array_that_decodes_matches_its_declared_dtype_and_shape(value):
    decoded = decodes_or_refuses(msgpack.packb(value, use_bin_type=True), MSGPACK)
    if isinstance(decoded, np.ndarray):
        assert decoded.dtype.str == value["dtype"]
        assert list(decoded.shape) == value["shape"]
        assert decoded.tobytes() == value["data"]


@fuzz_settings(200)
@given(st.lists(st.sampled_from([b"\x91", b"\x81\xa1a", b"\xdd\x00\x00\x00\x01"]), max_size=8))
def test_nesting_prefixes_decode_or_refuse(prefixes):
    for depth in (1, 10, 2000, 200_000):
        body = b"".join(prefixes) * depth + b"\xc0"
        decodes_or_refuses(body, MSGPACK)


def nested(depth: int) -> list[tuple[bytes, str]]:
    """Bodies nested ``depth`` deep: msgpack arrays, JSON arrays, JSON objects."""
    return [
        (b"\x91" * depth + b"\xc0", MSGPACK),
        (b"[" * depth + b"]" * depth, JSON),
        (b'{"a":' * depth + b"1" + b"}" * depth, JSON),
    ]


def test_moderately_nested_bodies_decode():
    for body, encoding in nested(500):
        unpack(body, encoding)


def test_too_deeply_nested_bodies_are_refused_with_a_reason():
    for body, encoding in nested(100_000):
        with pytest.raises(CodecError, match=r"not valid (msgpack|JSON): \S"):
            unpack(body, encoding)


@fuzz_settings(300)
@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_behind_a_valid_prefix_decode_or_refuse(tail):
    for prefix in (b"\x83\xa3top\x01\xa4text", b'{"top_k": 1, "x": ', b"\xc7\xff\x05", b"\xdf"):
        for encoding in (MSGPACK, JSON):
            decodes_or_refuses(prefix + tail, encoding)


@fuzz_settings(150)
@given(JSON_VALUES)
def test_json_values_round_trip(value):
    assert unpack(pack(value, JSON), JSON) == value


@fuzz_settings(150)
@given(MSGPACK_PLAIN_VALUES)
def test_msgpack_values_round_trip(value):
    assert unpack(pack(value, MSGPACK), MSGPACK) == value


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_cannot_be_packed_as_msgpack(number):
    with pytest.raises(CodecError, match="cannot encode"):
        pack({"n": [number]}, MSGPACK)


@fuzz_settings(150)
@given(
    st.sampled_from(
        [
            "NaN",
            "-Infinity",
            "Infinity",
            "1e400",
            "-1e400",
            "1" * 5000,
            "-" + "9" * 4301,
            "0.5e-400",
        ]
    ),
    st.sampled_from(['{"top_k": %s}', "[%s]", "%s", '{"a": [1, {"b": %s}]}']),
)
def test_json_numbers_beyond_float_and_int_limits(number, template):
    body = (template % number).encode()
    value = decodes_or_refuses(body, JSON)
    if value is not None:  # 1e400 is inf, 0.5e-400 is 0.0: valid JSON numbers, odd values
        for model in MODELS:
            validates_or_refuses(model, value)


@pytest.mark.parametrize(
    "text", ['"\\ud800"', '"a\\udfffb"', '{"\\ud83c": 1}', '["ok", ["\\udc00"]]', '"\\uDBFF"']
)
def test_json_lone_surrogates_are_refused(text):
    with pytest.raises(CodecError, match="surrogate"):
        unpack(text.encode(), JSON)


@pytest.mark.parametrize("text", ['"\\ud83c\\udfad"', '"\\\\ud800"', '"\\u00e9"'])
def test_json_surrogate_pairs_and_escaped_backslashes_still_decode(text):
    assert unpack(text.encode(), JSON) == json.loads(text)


@fuzz_settings(100)
@given(st.text(max_size=20).map(lambda t: t + "\ud800"))
def test_a_lone_surrogate_cannot_be_packed_either(text):
    for encoding in (MSGPACK, JSON):
        with pytest.raises(CodecError):
            unpack(pack({"text": text}, encoding), encoding)


@fuzz_settings(100)
@given(st.binary(max_size=60))
def test_bodies_in_other_unicode_encodings_decode_or_refuse(raw):
    for codec in ("utf-16", "utf-32", "utf-8-sig", "latin-1"):
        with contextlib.suppress(UnicodeDecodeError):
            decodes_or_refuses(raw.decode("latin-1").encode(codec), JSON)


# -- the request models --------------------------------------------------------------------------

SCORE = {
    "student_tokenizer": "abc",
    "top_k": 4,
    "sequences": [{"prompt": {"text": "hi"}, "completion_ids": [1, 2]}],
}
GENERATE = {"prompts": [{"text": "hi"}], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9}
REGISTER = {"name": "x", "hub": "gpt2"}
#: Every place a field sits in a valid body, as a path of keys and indices.
FIELD_PATHS: list[tuple[type[BaseModel], dict[str, Any], tuple[Any, ...]]] = [
    (ScoreRequest, SCORE, ("student_tokenizer",)),
    (ScoreRequest, SCORE, ("top_k",)),
    (ScoreRequest, SCORE, ("sequences",)),
    (ScoreRequest, SCORE, ("sequences", 0)),
    (ScoreRequest, SCORE, ("sequences", 0, "prompt")),
    (ScoreRequest, SCORE, ("sequences", 0, "prompt", "text")),
    (ScoreRequest, SCORE, ("sequences", 0, "completion_ids")),
    (ScoreRequest, SCORE, ("sequences", 0, "completion_ids", 0)),
    (ScoreRequest, SCORE, ("extra",)),
    (GenerateRequest, GENERATE, ("prompts",)),
    (GenerateRequest, GENERATE, ("prompts", 0, "text")),
    (GenerateRequest, GENERATE, ("max_tokens",)),
    (GenerateRequest, GENERATE, ("temperature",)),
    (GenerateRequest, GENERATE, ("top_p",)),
    (GenerateRequest, GENERATE, ("seed",)),
    (RegisterTokenizerRequest, REGISTER, ("name",)),
    (RegisterTokenizerRequest, REGISTER, ("hub",)),
    (RegisterTokenizerRequest, REGISTER, ("special_tokens",)),
    (RegisterTokenizerRequest, REGISTER, ("chat_template",)),
]


@FUZZ
@given(st.sampled_from(FIELD_PATHS), FIELD_VALUES)
def test_any_value_in_any_field_validates_or_raises_validation_error(where, value):
    model, body, path = where
    validated = validates_or_refuses(model, replaced(body, path, value))
    if isinstance(validated, ScoreRequest):
        for sequence in validated.sequences:
            assert all(type(i) is int and i >= 0 for i in sequence.completion_ids)
    if isinstance(validated, GenerateRequest):
        assert math.isfinite(validated.temperature) and 0 < validated.top_p <= 1
        assert validated.seed is None or -(2**63) <= validated.seed < 2**63


@fuzz_settings(150)
@given(st.sampled_from(MODELS), FIELD_VALUES)
def test_any_body_validates_or_raises_validation_error(model, value):
    validates_or_refuses(model, value)


@fuzz_settings(150)
@given(st.sampled_from(FIELD_PATHS), FIELD_VALUES)
def test_any_field_value_through_the_wire_decodes_then_validates_or_refuses(where, value):
    """The route's own order: decode the body, then validate; each step refuses cleanly."""
    model, body, path = where
    candidate = replaced(body, path, 0)
    *parents, last = path
    target = candidate
    for key in parents:
        target = target[key]
    target[last] = value  # the raw value, numpy arrays and bytes included
    for encoding in (MSGPACK, JSON):
        try:
            wire = pack(candidate, encoding)
        except CodecError:
            continue  # e.g. a lone surrogate: the encoder refuses it as the decoder would
        decoded = decodes_or_refuses(wire, encoding)
        if decoded is not None:
            validates_or_refuses(model, decoded)


@fuzz_settings(100)
@given(
    st.sampled_from(["<i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8"]),
    st.lists(st.integers(0, 2**64 - 1), max_size=6),
)
def test_typed_array_ids_keep_their_exact_values(dtype, values):
    info = np.iinfo(np.dtype(dtype))
    values = [v for v in values if v <= info.max]
    array = np.array(values, dtype=dtype)
    prompt = Prompt.model_validate({"ids": unpack(pack(array))})
    assert prompt.ids == values


SCORE_REQUESTS = st.builds(
    lambda tokenizer, k, sequences: {
        "student_tokenizer": tokenizer,
        "top_k": k,
        "sequences": sequences,
    },
    st.text(min_size=1, max_size=128),
    st.integers(1, 2**63 - 1),
    st.lists(
        st.fixed_dictionaries(
            {
                "prompt": st.one_of(
                    st.fixed_dictionaries({"text": ODD_TEXT}),
                    st.fixed_dictionaries({"ids": st.lists(st.integers(0, 2**63 - 1))}),
                    st.fixed_dictionaries(
                        {
                            "messages": st.lists(
                                st.fixed_dictionaries(
                                    {"role": st.text(min_size=1, max_size=64), "content": ODD_TEXT}
                                ),
                                min_size=1,
                                max_size=3,
                            )
                        }
                    ),
                ),
                "completion_ids": st.lists(st.integers(0, 2**64 - 1), max_size=8),
            }
        ),
        min_size=1,
        max_size=3,
    ),
)


@FUZZ
@given(SCORE_REQUESTS, st.booleans())
def test_valid_score_requests_round_trip_through_both_encodings(body, as_arrays):
    request = ScoreRequest.model_validate(body)
    wire = request.model_dump(exclude_none=True)
    if as_arrays:  # the msgpack client sends ids as typed arrays
        for sequence in wire["sequences"]:
            ids = sequence["completion_ids"]
            sequence["completion_ids"] = np.array(ids, dtype=np.uint64 if ids else np.int64)
    for encoding in (MSGPACK, JSON):
        if encoding == JSON and as_arrays:
            continue
        assert ScoreRequest.model_validate(unpack(pack(wire, encoding), encoding)) == request


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "prompts": st.lists(st.fixed_dictionaries({"text": ODD_TEXT}), min_size=1, max_size=3),
            "max_tokens": st.integers(1, 2**63 - 1),
            "temperature": st.floats(0, 1e300),
            "top_p": st.floats(1e-300, 1.0),
            "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        }
    )
)
def test_valid_generate_requests_round_trip_through_both_encodings(body):
    request = GenerateRequest.model_validate(body)
    for encoding in (MSGPACK, JSON):
        wire = pack(request.model_dump(exclude_none=True), encoding)
        assert GenerateRequest.model_validate(unpack(wire, encoding)) == request


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**63),
        ("seed", 2**64 - 1),
        ("seed", -(2**63) - 1),
        ("seed", 10**30),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", math.nan),
        ("top_p", math.inf),
        ("max_tokens", 2.0),
        ("max_tokens", "3"),
    ],
)
def test_generate_refuses_values_the_engine_cannot_take(field, value):
    with pytest.raises(ValidationError, match=field):
        GenerateRequest.model_validate({**GENERATE, field: value})


def test_msgpack_uint64_and_json_huge_ints_stay_exact_ids():
    """They are refused later, by the vocabulary check, with the range: never wrapped."""
    for encoding in (MSGPACK, JSON):
        body = {**SCORE, "sequences": [{"prompt": {"ids": [2**64 - 1]}, "completion_ids": []}]}
        if encoding == JSON:
            body["sequences"][0]["completion_ids"] = [10**30]
        request = ScoreRequest.model_validate(unpack(pack(body, encoding), encoding))
        assert request.sequences[0].prompt.ids == [2**64 - 1]
