"""Regression tests for what the fuzzing found: each input once gave a 500, an exception out of the
app, or a misleading answer. The fixes are in ``shared/codec.py``, ``shared/protocol.py``,
``service/scoring.py`` and ``service/app.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from tokenbridge.shared.codec import pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import GenerateRequest, Prompt

from tests.support.fuzz import (
    AUTH,
    JSON,
    MSGPACK,
    assert_clean_refusal,
    body_of,
    fuzz_config,
    register,
    send,
    started_app,
)
from tests.support.service import AppHarness

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop) -> Iterator[AppHarness]:
    with started_app(fuzz_config(teacher_dir, tmp_path_factory.mktemp("regressions")), loop) as h:
        yield h


@pytest.fixture(scope="module")
def student(app) -> str:
    return register(app, "mistral-v1")["mistral-v1"]


def score(student: str, completion: object, prompt: object = None) -> dict:
    return {
        "student_tokenizer": student,
        "top_k": 2,
        "sequences": [{"prompt": prompt or {"text": "a"}, "completion_ids": completion}],
    }


# -- ids past int64: OverflowError in scoring.prepare (500) ------------------------------------


def test_a_msgpack_uint64_completion_id_is_422_with_the_range(app, student):
    body = msgpack.packb(score(student, [5, 2**64 - 1]))
    response = send(app, "POST", "/v1/score", content=body, headers=MSGPACK)
    assert_clean_refusal(response, (422,), "completion ids must lie in [0, 32000)")


def test_a_json_id_of_thirty_digits_is_422_with_the_range(app, student):
    body = json.dumps(score(student, [10**30])).encode()
    response = send(app, "POST", "/v1/score", content=body, headers=JSON)
    assert_clean_refusal(response, (422,), "[0, 32000)")


def test_a_prompt_id_of_four_thousand_digits_is_422_and_the_message_stays_short(app, student):
    body = json.dumps(score(student, [5], {"ids": [10**4000]})).encode()
    message = assert_clean_refusal(
        send(app, "POST", "/v1/score", content=body, headers=JSON), (422,), "a number of"
    )
    assert len(message) < 300


# -- uint64 typed arrays wrapped to negative ids (a misleading "must be >= 0") -------------------


def test_uint64_typed_array_ids_keep_their_value():
    big = 2**63 + 5
    assert Prompt.model_validate({"ids": np.array([big, 3], dtype=np.uint64)}).ids == [big, 3]


def test_a_uint64_typed_array_completion_is_refused_with_the_vocabulary_range(app, student):
    body = pack(score(student, np.array([2**63 + 5], dtype=np.uint64)))
    response = send(app, "POST", "/v1/score", content=body, headers=MSGPACK)
    assert_clean_refusal(response, (422,), "[0, 32000)")


# -- lone surrogates in JSON: TypeError in the teacher tokenizer (exception out of the app) -------


@pytest.mark.parametrize("route", ["/v1/score", "/v1/generate"])
def test_a_lone_surrogate_in_a_json_prompt_is_400(app, student, route):
    if route == "/v1/score":
        raw = json.dumps(score(student, [5], {"text": "\ud800x"})).encode()
    else:
        raw = b'{"prompts": [{"text": "\\udc00x"}], "max_tokens": 1}'
    assert b"\\ud" in raw
    assert_clean_refusal(
        send(app, "POST", route, content=raw, headers=JSON), (400,), "lone UTF-16 surrogate"
    )


def test_json_lone_surrogates_are_a_codec_error():
    with pytest.raises(CodecError, match="surrogate"):
        unpack(b'{"text": ["ok", "\\ud800"]}', "application/json")


# -- msgpack nested too deeply: "body is not valid msgpack: " with no reason ----------------------


def test_msgpack_nested_too_deeply_says_so(app):
    with pytest.raises(CodecError, match="nested too deeply"):
        unpack(b"\x91" * 5000 + b"\xc0")
    response = send(app, "POST", "/v1/score", content=b"\x91" * 5000 + b"\xc0", headers=MSGPACK)
    assert_clean_refusal(response, (400,), "nested too deeply")


# -- a 405 lost its Allow header in the error mapper ------------------------------------------


def test_method_not_allowed_keeps_allow_and_names_itself(app):
    response = send(app, "PUT", "/v1/score", headers=AUTH)
    assert_clean_refusal(response, (405,))
    assert response.headers["allow"] == "POST"
    assert body_of(response)["error"]["code"] == "method_not_allowed"


# -- generation parameters the engine cannot take ---------------------------------------------


def test_a_denormal_temperature_samples_greedily_instead_of_failing(app):
    """5e-324 divided the logits to inf: torch.multinomial raised on NaN probabilities (500)."""
    body = {"prompts": [{"text": "Once"}], "max_tokens": 4, "temperature": 5e-324, "seed": 1}
    tiny = send(app, "POST", "/v1/generate", content=pack(body), headers=MSGPACK)
    greedy = send(
        app, "POST", "/v1/generate", content=pack({**body, "temperature": 0.0}), headers=MSGPACK
    )
    assert tiny.status_code == 200, tiny.content[:300]
    assert body_of(tiny)["completions"] == body_of(greedy)["completions"]


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -(2**63) - 1, 10**30])
def test_seeds_past_int64_are_422(app, seed):
    """seed + i reached 2**64 and torch.manual_seed raised (500)."""
    body = {"prompts": [{"text": "a"}, {"text": "b"}], "max_tokens": 1, "seed": seed}
    raw = json.dumps(body).encode()
    assert_clean_refusal(
        send(app, "POST", "/v1/generate", content=raw, headers=JSON), (422,), "seed"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", np.array([0.5])), ("top_p", np.array([[0.5]])), ("temperature", "0.5")],
)
def test_sampling_numbers_are_plain_numbers(field, value):
    """A one-element typed array was silently read as its value (a numpy deprecation)."""
    with pytest.raises(ValidationError, match=field):
        GenerateRequest.model_validate({"prompts": [{"text": "a"}], field: value})


# -- a Rust panic is a BaseException: Starlette's handlers let it out of the app -----------------


def panic_exception_type() -> type[BaseException]:
    """``pyo3_runtime.PanicException``, caught from a tokenizer that panics when loaded."""
    broken = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    source = {"version": "1.0", "normalizer": broken, "model": {"type": "BPE", "vocab": {}}}
    try:
        Tokenizer.from_str(json.dumps(source))
    except BaseException as error:
        return type(error)
    raise AssertionError("the tokenizer loaded")


def test_a_panic_escaping_a_handler_is_a_500_with_the_error_body(app, monkeypatch):
    panic = panic_exception_type()
    assert not issubclass(panic, Exception)

    def boom() -> None:
        raise panic("a Rust panic")

    monkeypatch.setattr(app.service, "info", boom)
    response = send(app, "GET", "/v1/info", headers=AUTH)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal" and "request" in error["message"]
    assert "panic" not in error["message"]
    assert response.headers["x-request-id"] in error["message"]
    monkeypatch.undo()
    assert send(app, "GET", "/v1/info", headers=AUTH).status_code == 200
