"""The v1 wire protocol (``shared/protocol.py``): request validation and reading score responses.

Requests are pydantic models that refuse anything ambiguous or loosely typed; ``ScoredSequence``
reads the same numbers from a msgpack body (typed arrays) and from a JSON body (lists with nulls).
"""

from __future__ import annotations

import json
from datetime import UTC

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tokenbridge.shared.codec import JSON, pack, unpack
from tokenbridge.shared.protocol import (
    SCORE_ARRAY_DTYPES,
    GenerateRequest,
    Prompt,
    RegisterTokenizerRequest,
    ScoredSequence,
    ScoreRequest,
)


def score_request(**overrides):
    body = {
        "student_tokenizer": "gpt2",
        "top_k": 4,
        "sequences": [{"prompt": {"text": "Hello"}, "completion_ids": [1, 2, 3]}],
    }
    body.update(overrides)
    return body


def sequence(completion_ids=(5, 6), **prompt):
    return {"prompt": prompt or {"text": "Hi"}, "completion_ids": completion_ids}


# --- Prompt --------------------------------------------------------------------------------------


def test_prompt_forms_and_their_kind():
    assert Prompt(text="hi").kind == "text"
    assert Prompt(text="").kind == "text"
    assert Prompt(messages=[{"role": "user", "content": "hi"}]).kind == "messages"
    assert Prompt(ids=[0, 1, 2]).kind == "ids"
    assert Prompt(ids=[]).kind == "ids"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"text": "a", "ids": [1]},
        {"text": "a", "messages": [{"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "ids": [1]},
        {"text": "a", "messages": [{"role": "user", "content": "x"}], "ids": [1]},
        {"text": None, "ids": None},
    ],
)
def test_prompt_needs_exactly_one_form(fields):
    with pytest.raises(ValidationError, match="exactly one of 'text', 'messages' or 'ids'"):
        Prompt.model_validate(fields)


def test_prompt_refuses_an_empty_message_list():
    with pytest.raises(ValidationError, match="at least one message"):
        Prompt(messages=[])


@pytest.mark.parametrize(
    "message",
    [{"role": "", "content": "x"}, {"role": "user"}, {"role": "u", "content": "x", "x": 1}],
)
def test_prompt_refuses_malformed_messages(message):
    with pytest.raises(ValidationError):
        Prompt(messages=[message])


def test_prompt_ids_accept_an_integer_array_and_refuse_negative_ids():
    assert Prompt(ids=np.array([3, 0, 7], dtype=np.int16)).ids == [3, 0, 7]
    with pytest.raises(ValidationError):
        Prompt(ids=[1, -1])


def test_models_are_frozen():
    prompt = Prompt(text="a")
    with pytest.raises(ValidationError):
        prompt.text = "b"


# --- ScoreRequest --------------------------------------------------------------------------------


def test_a_valid_score_request():
    request = ScoreRequest.model_validate(score_request())
    assert request.top_k == 4
    assert request.sequences[0].completion_ids == [1, 2, 3]
    assert request.sequences[0].prompt.kind == "text"


@pytest.mark.parametrize("top_k", [0, -1, "3", 3.0, 3.5, True, None, [3]])
def test_score_request_refuses_bad_top_k(top_k):
    with pytest.raises(ValidationError, match="top_k"):
        ScoreRequest.model_validate(score_request(top_k=top_k))


def test_score_request_refuses_empty_sequences():
    with pytest.raises(ValidationError, match="sequences"):
        ScoreRequest.model_validate(score_request(sequences=[]))


@pytest.mark.parametrize("ids", [[1, -1], [-5], [1, "2"], [1.0], [True], [None], "123", 5])
def test_score_request_refuses_bad_completion_ids(ids):
    with pytest.raises(ValidationError, match="completion_ids"):
        ScoreRequest.model_validate(score_request(sequences=[sequence(ids)]))


@pytest.mark.parametrize("ids", [[1, -1], [2.0]])
def test_prompt_ids_inside_a_score_request_are_checked_too(ids):
    with pytest.raises(ValidationError, match="ids"):
        ScoreRequest.model_validate(score_request(sequences=[sequence(ids=ids)]))


@pytest.mark.parametrize(
    "body",
    [
        score_request(unknown=1),
        score_request(sequences=[{**sequence(), "extra": True}]),
        score_request(sequences=[sequence(text="a", color="red")]),
    ],
)
def test_unknown_fields_are_refused(body):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ScoreRequest.model_validate(body)


@pytest.mark.parametrize("tokenizer", ["", "x" * 129])
def test_student_tokenizer_name_length_is_bounded(tokenizer):
    with pytest.raises(ValidationError, match="student_tokenizer"):
        ScoreRequest.model_validate(score_request(student_tokenizer=tokenizer))


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]),
    st.lists(st.integers(0, 127), max_size=20),
)
def test_completion_ids_accept_a_1d_integer_array(dtype, ids):
    array = np.array(ids, dtype=dtype)
    request = ScoreRequest.model_validate(score_request(sequences=[sequence(array)]))
    completion = request.sequences[0].completion_ids
    assert completion == ids
    assert all(type(i) is int for i in completion)


def test_completion_ids_from_a_msgpack_body():
    body = unpack(pack(score_request(sequences=[sequence(np.array([1, 40_000, 7]))])))
    assert isinstance(body["sequences"][0]["completion_ids"], np.ndarray)
    request = ScoreRequest.model_validate(body)
    assert request.sequences[0].completion_ids == [1, 40_000, 7]


@pytest.mark.parametrize(
    "array",
    [
        np.array([[1, 2], [3, 4]]),
        np.array([1.0, 2.0]),
        np.array([1, 2], dtype=np.float16),
        np.array(3),
        np.array([True, False]),
        np.array([-1, 2]),
    ],
)
def test_completion_ids_refuse_bad_arrays(array):
    with pytest.raises(ValidationError, match="completion_ids"):
        ScoreRequest.model_validate(score_request(sequences=[sequence(array)]))


# --- GenerateRequest -----------------------------------------------------------------------------


def test_a_valid_generate_request_and_its_defaults():
    request = GenerateRequest(
        prompts=[{"text": "a"}, {"messages": [{"role": "u", "content": "b"}]}]
    )
    # max_tokens left out: the service picks min(128, its max_generate_tokens).
    assert (request.max_tokens, request.temperature, request.top_p, request.seed) == (
        None,
        1.0,
        1.0,
        None,
    )


def test_generate_request_refuses_ids_prompts():
    with pytest.raises(ValidationError, match="not student 'ids'"):
        GenerateRequest(prompts=[{"text": "a"}, {"ids": [1, 2]}])


@pytest.mark.parametrize("max_tokens", [0, -3, "5", 5.0])
def test_generate_request_refuses_bad_max_tokens(max_tokens):
    with pytest.raises(ValidationError, match="max_tokens"):
        GenerateRequest(prompts=[{"text": "a"}], max_tokens=max_tokens)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.0000001, 2.0])
def test_generate_request_refuses_top_p_outside_0_1(top_p):
    with pytest.raises(ValidationError, match="top_p"):
        GenerateRequest(prompts=[{"text": "a"}], top_p=top_p)


@pytest.mark.parametrize("top_p", [1e-9, 0.5, 1.0])
def test_generate_request_accepts_top_p_inside_0_1(top_p):
    assert GenerateRequest(prompts=[{"text": "a"}], top_p=top_p).top_p == top_p


def test_generate_request_refuses_negative_temperature_and_no_prompts():
    with pytest.raises(ValidationError, match="temperature"):
        GenerateRequest(prompts=[{"text": "a"}], temperature=-0.5)
    with pytest.raises(ValidationError, match="prompts"):
        GenerateRequest(prompts=[])


# --- RegisterTokenizerRequest --------------------------------------------------------------------


@pytest.mark.parametrize("source", ["path", "hub", "tokenizer_json"])
def test_register_tokenizer_accepts_one_source(source):
    request = RegisterTokenizerRequest(name="s", **{source: "x"})
    assert getattr(request, source) == "x"


@pytest.mark.parametrize(
    "sources",
    [
        {},
        {"path": "a", "hub": "b"},
        {"hub": "b", "tokenizer_json": "{}"},
        dict.fromkeys(("path", "hub", "tokenizer_json"), "x"),
    ],
)
def test_register_tokenizer_needs_exactly_one_source(sources):
    with pytest.raises(ValidationError, match="exactly one of 'path', 'hub' or 'tokenizer_json'"):
        RegisterTokenizerRequest(name="s", **sources)


def test_register_tokenizer_refuses_an_empty_name():
    with pytest.raises(ValidationError, match="name"):
        RegisterTokenizerRequest(name="", hub="gpt2")


# --- ScoredSequence.from_wire --------------------------------------------------------------------


def wire_sequence(length: int, top_k: int, seed: int, candidates: int = 0) -> dict:
    """One entry of a score response's ``sequences``, as the service builds it, with NaN
    log-probs and masses and ``-inf`` sparse log-probs in some places; with ``candidates``, the
    §4b arrays of that many named candidates too."""
    rng = np.random.default_rng(seed)
    holes = rng.random(length) < 0.3
    logprobs = -rng.exponential(size=length).astype(np.float32)
    logprobs[holes] = np.nan
    topk = -rng.exponential(size=(length, top_k))
    topk[rng.random((length, top_k)) < 0.2] = -np.inf
    tail = rng.random(length)
    tail[holes] = np.nan
    unresolved = rng.random(length)
    unresolved[~holes] = np.nan
    arrays = {
        "logprobs": logprobs,
        "topk_ids": rng.integers(0, 150_000, size=(length, top_k)),
        "topk_logprobs": topk,
        "chunk_ids": np.sort(rng.integers(0, max(length, 1), size=length)),
        "tail_mass": tail,
        "unresolved_mass": unresolved,
        "exact": rng.random(length) < 0.5,
    }
    if candidates:
        named = -rng.exponential(size=(length, candidates))
        named[rng.random((length, candidates)) < 0.2] = -np.inf
        arrays["candidate_logprobs"] = named
        arrays["candidate_unresolved_mass"] = rng.random((length, candidates)) * 0.1
    else:
        arrays = {**arrays, "candidate_logprobs": None, "candidate_unresolved_mass": None}
    value = {
        name: arrays[name].astype(dtype)
        for name, dtype in SCORE_ARRAY_DTYPES.items()
        if arrays[name] is not None
    }
    value["chunk_logprobs"] = -rng.exponential(size=max(length - 1, 0)).astype(np.float32)
    value["alignment"] = {"one_to_one": 0.75, "chunks": length}
    return value


def assert_reads_back(scored: ScoredSequence, wire: dict, top_k: int) -> None:
    length = len(wire["logprobs"])
    expected = {
        "logprobs_S": (wire["logprobs"].astype(np.float32), np.float32, (length,)),
        "topk_ids_SK": (wire["topk_ids"].astype(np.int64), np.int64, (length, top_k)),
        "topk_logprobs_SK": (wire["topk_logprobs"].astype(np.float32), np.float32, (length, top_k)),
        "chunk_ids_S": (wire["chunk_ids"].astype(np.int64), np.int64, (length,)),
        "tail_mass_S": (wire["tail_mass"].astype(np.float32), np.float32, (length,)),
        "unresolved_mass_S": (wire["unresolved_mass"].astype(np.float32), np.float32, (length,)),
        "exact_S": (wire["exact"], np.bool_, (length,)),
        "chunk_logprobs_C": (wire["chunk_logprobs"], np.float32, wire["chunk_logprobs"].shape),
    }
    for name, (values, dtype, shape) in expected.items():
        got = getattr(scored, name)
        assert got.dtype == dtype, name
        assert got.shape == shape, name
        np.testing.assert_array_equal(got, values, err_msg=name)  # NaN == NaN here
    assert scored.alignment == wire["alignment"]
    if "candidate_logprobs" not in wire:
        assert scored.candidate_logprobs_SC is None and scored.candidate_unresolved_SC is None
        return
    for name, field in (("candidate_logprobs", "candidate_logprobs_SC"),
                        ("candidate_unresolved_mass", "candidate_unresolved_SC")):  # fmt: skip
        got = getattr(scored, field)
        want = wire[name].astype(np.float32)
        assert got is not None and got.dtype == np.float32, name
        assert got.shape == (length, want.shape[1] if length else got.shape[1]), name
        np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=name)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 6), st.integers(1, 5), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 4]))
def test_from_wire_reads_the_same_numbers_from_msgpack_and_json(length, top_k, seed, candidates):
    wire = wire_sequence(length, top_k, seed, candidates)
    from_msgpack = ScoredSequence.from_wire(unpack(pack({"s": wire}))["s"], top_k)
    from_json = ScoredSequence.from_wire(json.loads(pack({"s": wire}, JSON))["s"], top_k)
    assert_reads_back(from_msgpack, wire, top_k)
    assert_reads_back(from_json, wire, top_k)


def test_json_nulls_become_nan_and_sparse_nulls_minus_inf():
    wire = wire_sequence(4, 2, seed=0)
    wire["logprobs"][:] = np.nan
    wire["tail_mass"][0] = np.nan
    wire["unresolved_mass"][1] = np.nan
    wire["topk_logprobs"][2, 1] = -np.inf
    as_json = json.loads(pack(wire, JSON))
    assert as_json["logprobs"] == [None] * 4
    assert as_json["topk_logprobs"][2][1] is None
    scored = ScoredSequence.from_wire(as_json, 2)
    assert np.isnan(scored.logprobs_S).all()
    assert np.isnan(scored.tail_mass_S[0]) and np.isnan(scored.unresolved_mass_S[1])
    assert scored.topk_logprobs_SK[2, 1] == -np.inf


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_an_empty_completion_from_json_gets_zero_by_k_rows(top_k):
    wire = wire_sequence(0, top_k, seed=1)
    as_json = json.loads(pack(wire, JSON))
    assert as_json["topk_logprobs"] == [] and as_json["topk_ids"] == []
    scored = ScoredSequence.from_wire(as_json, top_k)
    assert scored.topk_logprobs_SK.shape == (0, top_k)
    assert scored.topk_ids_SK.shape == (0, top_k)
    assert scored.logprobs_S.shape == (0,)
    from_msgpack = ScoredSequence.from_wire(unpack(pack(wire)), top_k)
    assert from_msgpack.topk_logprobs_SK.shape == (0, top_k)
    assert from_msgpack.topk_ids_SK.shape == (0, top_k)


def test_integer_arrays_travel_narrow_and_are_read_back_wide():
    wire = wire_sequence(3, 2, seed=2)
    wire["topk_ids"] = np.array([[1, 2], [3, 4], [5, 6]], dtype="<i4")
    body = unpack(pack(wire))
    assert body["topk_ids"].dtype == np.int8  # narrowed on the wire
    scored = ScoredSequence.from_wire(body, 2)
    assert scored.topk_ids_SK.dtype == np.int64
    assert scored.topk_ids_SK.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_retry_after_reads_seconds_and_http_dates():
    from datetime import datetime
    from email.utils import format_datetime

    from tokenbridge.shared.protocol import retry_after_seconds

    now = 1_800_000_000.0
    assert retry_after_seconds("2", now) == 2.0
    assert retry_after_seconds("-3", now) == 0.0
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("soon", now) is None
    in_five = format_datetime(datetime.fromtimestamp(now + 5, tz=UTC), usegmt=True)
    assert retry_after_seconds(in_five, now) == 5.0
    past = format_datetime(datetime.fromtimestamp(now - 60, tz=UTC), usegmt=True)
    assert retry_after_seconds(past, now) == 0.0
