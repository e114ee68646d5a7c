"""Fuzzing every route of the real app (tiny GPT-2 teacher, in-process, API key required).

Every hostile request gets a 4xx with ``{"error": {"code", "message"}}`` (``assert_clean_refusal``),
never a 500 and never an exception out of the app (``httpx.ASGITransport`` would raise it here);
valid requests that the fuzzer happens to build get a 200 whose arrays have the promised shapes.
The last test checks that, after all of it, a score request still answers the teacher's numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbridge.shared.codec import pack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.fuzz import (
    AUTH,
    FIELD_VALUES,
    FUZZ,
    INTEGERS,
    JSON,
    MAX_BODY_BYTES,
    MAX_GENERATE_TOKENS,
    MAX_SEQUENCES,
    MAX_TOP_K,
    MSGPACK,
    ODD_TEXT,
    assert_clean_refusal,
    body_of,
    fuzz_config,
    fuzz_settings,
    register,
    send,
    started_app,
)
from tests.support.service import AppHarness, direct_logprobs

pytestmark = pytest.mark.fuzz

PROMPT = "HAMLET.\n"
VOCAB = {"gpt2": 50257, "mistral-v1": 32000}
BODY_ROUTES = ("/v1/score", "/v1/generate", "/v1/tokenizers")
GUARDED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/info"),
    ("GET", "/v1/tokenizers"),
    ("POST", "/v1/tokenizers"),
    ("GET", "/v1/tokenizers/abc"),
    ("DELETE", "/v1/tokenizers/abc"),
    ("POST", "/v1/score"),
    ("POST", "/v1/generate"),
]


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop) -> Iterator[AppHarness]:
    config = fuzz_config(teacher_dir, tmp_path_factory.mktemp("fuzz-routes"))
    with started_app(config, loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def students(app) -> dict[str, str]:
    return register(app, "gpt2", "mistral-v1")


def score_body(student: str, completion: Any = (5, 6, 7), **overrides: Any) -> dict[str, Any]:
    body = {
        "student_tokenizer": student,
        "top_k": 4,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": list(completion)}],
    }
    return {**body, **overrides}


def post(app: AppHarness, path: str, body: Any, encoding: str = "msgpack") -> httpx.Response:
    """``body`` packed in ``encoding`` (msgpack with typed arrays, or JSON) and posted."""
    if encoding == "msgpack":
        return send(app, "POST", path, content=pack(body), headers=MSGPACK)
    return send(app, "POST", path, content=pack(body, "application/json"), headers=JSON)


def assert_scored(response: httpx.Response, completions: list[list[int]], vocab: int) -> None:
    """A 200 score answer with one entry per completion and every array the right shape."""
    assert response.status_code == 200, response.content[:400]
    body = body_of(response)
    k = body["top_k"]
    assert len(body["sequences"]) == len(completions)
    for wire, ids in zip(body["sequences"], completions, strict=True):
        seq = ScoredSequence.from_wire(wire, k)
        n = len(ids)
        assert seq.logprobs_S.shape == (n,) and seq.topk_ids_SK.shape == (n, k)
        assert seq.topk_logprobs_SK.shape == (n, k)
        for name in ("chunk_ids_S", "tail_mass_S", "unresolved_mass_S", "exact_S"):
            assert getattr(seq, name).shape == (n,), name
        assert ((seq.topk_ids_SK >= -1) & (seq.topk_ids_SK < vocab)).all()
        if n:
            chunks = seq.chunk_ids_S
            assert chunks[0] == 0 and (np.diff(chunks) >= 0).all()
            assert len(seq.chunk_logprobs_C) == chunks[-1] + 1
        assert not np.isnan(seq.topk_logprobs_SK).any()  # padding is -inf, never NaN


def ok_or_refused(response: httpx.Response) -> None:
    """A 2xx, or a clean 4xx: never a 5xx."""
    if response.status_code >= 300:
        assert_clean_refusal(response)


# -- bodies that do not decode ----------------------------------------------------------------


@fuzz_settings(120)
@given(st.sampled_from(BODY_ROUTES), st.binary(min_size=1, max_size=300), st.booleans())
def test_arbitrary_bytes_are_refused_on_every_body_route(app, students, route, body, as_json):
    headers = JSON if as_json else MSGPACK
    response = send(app, "POST", route, content=body, headers=headers)
    assert_clean_refusal(response, (400, 413, 422))


@fuzz_settings(120)
@given(
    st.sampled_from(["gpt2", "mistral-v1"]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(1, 10_000),
    st.booleans(),
)
def test_mutated_valid_bodies_are_scored_or_refused(app, students, name, edits, cut, as_json):
    good = score_body(students[name], completion=np.array([5, 6, 7, 300], dtype=np.int32))
    body = bytearray(pack(good, "application/json" if as_json else "application/msgpack"))
    for position, byte in edits:
        body[position % len(body)] = byte
    for candidate in (bytes(body), bytes(body[: cut % len(body) + 1])):
        response = send(
            app, "POST", "/v1/score", content=candidate, headers=JSON if as_json else MSGPACK
        )
        ok_or_refused(response)


@pytest.mark.parametrize("depth", [50, 900, 5_000, 100_000])
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_deeply_nested_bodies_are_refused(app, students, depth, encoding):
    if encoding == "msgpack":
        inner = b"\x91" * depth + b"\xc0"
        body = b"\x82\xa4name\xa1x\xa3hub" + inner
        headers = MSGPACK
    else:
        inner = b"[" * depth + b"]" * depth
        body = b'{"name": "x", "hub": ' + inner + b"}"
        headers = JSON
    for route in BODY_ROUTES:
        response = send(app, "POST", route, content=body, headers=headers)
        assert_clean_refusal(response, (400, 422))


@pytest.mark.parametrize(
    "value", [[1, 2], "text", 5, None, True, 1.5, b"raw", [], [{"top_k": 1}]], ids=repr
)
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_non_map_bodies_are_refused(app, value, encoding):
    if encoding == "json" and isinstance(value, bytes):
        value = value.decode()
    for route in BODY_ROUTES:
        assert_clean_refusal(post(app, route, value, encoding), (422,), "map/object")


def test_empty_bodies_are_refused(app):
    for route in BODY_ROUTES:
        for headers in (MSGPACK, JSON, AUTH):
            assert_clean_refusal(
                send(app, "POST", route, content=b"", headers=headers), (400,), "no body"
            )


# -- hostile values in decodable bodies --------------------------------------------------------

FIELDS = {
    "/v1/score": [
        ("student_tokenizer",),
        ("top_k",),
        ("sequences",),
        ("sequences", 0),
        ("sequences", 0, "prompt"),
        ("sequences", 0, "prompt", "text"),
        ("sequences", 0, "completion_ids"),
        ("sequences", 0, "completion_ids", 1),
        ("surprise",),
    ],
    "/v1/generate": [
        ("prompts",),
        ("prompts", 0),
        ("prompts", 0, "text"),
        ("max_tokens",),
        ("temperature",),
        ("top_p",),
        ("seed",),
    ],
    "/v1/tokenizers": [
        ("name",),
        ("hub",),
        ("special_tokens",),
        ("chat_template",),
        ("tokenizer_json",),
        ("path",),
    ],
}


def valid_body(route: str, students: dict[str, str]) -> dict[str, Any]:
    if route == "/v1/score":
        return score_body(students["mistral-v1"])
    if route == "/v1/generate":
        return {"prompts": [{"text": "Once"}], "max_tokens": 2, "seed": 1}
    return {"name": "again", "hub": "gpt2"}


def with_value(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    *parents, last = path
    target: Any = copy
    for key in parents:
        target = target[key]
    target[last] = value
    return copy


@fuzz_settings(150)
@given(
    st.sampled_from([(route, path) for route, paths in FIELDS.items() for path in paths]),
    FIELD_VALUES,
    st.booleans(),
)
def test_any_value_in_any_field_is_handled_or_refused(app, students, where, value, as_json):
    route, path = where
    body = with_value(valid_body(route, students), path, 0)
    *parents, last = path
    target: Any = body
    for key in parents:
        target = target[key]
    target[last] = value
    try:
        wire = pack(body, "application/json" if as_json else "application/msgpack")
    except Exception:
        return  # not representable in this encoding (a lone surrogate, a 65-bit int in msgpack)
    response = send(app, "POST", route, content=wire, headers=JSON if as_json else MSGPACK)
    ok_or_refused(response)


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b'{"student_tokenizer": "s", "top_k": NaN, "sequences": []}', 400, "not valid JSON"),
        (b'{"student_tokenizer": "s", "top_k": Infinity, "sequences": []}', 400, "not valid JSON"),
        (b'{"student_tokenizer": "s", "top_k": 1e400, "sequences": []}', 422, "top_k"),
        (b'{"student_tokenizer": "s", "top_k": -1e400, "sequences": []}', 422, "top_k"),
        (b'{"student_tokenizer": "s", "top_k": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
        (b'{"student_tokenizer": "s", "top_k": "4", "sequences": []}', 422, "top_k"),
        (b'{"student_tokenizer": 7, "top_k": 4, "sequences": []}', 422, "student_tokenizer"),
        (b'{"student_tokenizer": "\\ud800", "top_k": 4, "sequences": []}', 400, "surrogate"),
    ],
)
def test_json_numbers_strings_and_escapes_beyond_the_protocol(app, raw, status, needle):
    assert_clean_refusal(
        send(app, "POST", "/v1/score", content=raw, headers=JSON), (status,), needle
    )


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, 2**64 - 1, 2**63, -(2**63), 1e308, -0.0, "0.5", True, None],
    ids=repr,
)
@pytest.mark.parametrize("field", ["max_tokens", "temperature", "top_p", "seed"])
def test_generate_parameters_at_and_beyond_their_limits(app, field, value):
    body = {"prompts": [{"text": "Once"}, {"text": "upon"}], "max_tokens": 2, field: value}
    response = post(app, "/v1/generate", body)
    ok_or_refused(response)
    if response.status_code == 200:
        assert len(body_of(response)["completions"]) == 2


def test_the_largest_seed_samples_every_prompt(app):
    """seed + i for prompt i stays within what the engine takes (no overflow at 2**63 - 1)."""
    body = {"prompts": [{"text": "a"}] * MAX_SEQUENCES, "max_tokens": 1, "seed": 2**63 - 1}
    response = post(app, "/v1/generate", body)
    assert response.status_code == 200, response.content[:300]


# -- token ids ---------------------------------------------------------------------------------


@FUZZ
@given(
    st.sampled_from(["gpt2", "mistral-v1"]),
    st.lists(st.one_of(st.integers(-5, 60_000), INTEGERS), max_size=12),
    st.sampled_from(["list", "json", "int64", "uint64"]),
)
def test_completion_ids_anywhere_in_the_integer_range(app, students, name, ids, form):
    vocab = VOCAB[name]
    if form in ("int64", "uint64"):
        info = np.iinfo(form)
        if any(not info.min <= i <= info.max for i in ids):
            return
        completion: Any = np.array(ids, dtype=form)
    else:
        if form == "list" and any(not -(2**63) <= i < 2**64 for i in ids):
            return
        completion = ids
    encoding = "json" if form == "json" else "msgpack"
    response = post(app, "/v1/score", score_body(students[name], completion), encoding)
    if all(0 <= i < vocab for i in ids):
        assert_scored(response, [ids], vocab)
    elif any(i < 0 for i in ids):
        assert_clean_refusal(response, (422,), "greater than or equal to 0")
    else:
        assert_clean_refusal(response, (422,), f"[0, {vocab})")


@fuzz_settings(40)
@given(
    st.sampled_from(["gpt2", "mistral-v1"]),
    st.lists(st.one_of(st.integers(-3, 60_000), INTEGERS), max_size=8),
)
def test_prompt_ids_anywhere_in_the_integer_range(app, students, name, ids):
    vocab = VOCAB[name]
    if any(not -(2**63) <= i < 2**64 for i in ids):
        return
    body = score_body(students[name])
    body["sequences"][0]["prompt"] = {"ids": ids}
    response = post(app, "/v1/score", body)
    if all(0 <= i < vocab for i in ids):
        assert_scored(response, [[5, 6, 7]], vocab)
    elif any(i < 0 for i in ids):
        assert_clean_refusal(response, (422,), "greater than or equal to 0")
    else:
        assert_clean_refusal(response, (422,), f"[0, {vocab})")


def in_vocab_ids(name: str) -> st.SearchStrategy[int]:
    """Any id of the student's vocabulary, its specials and (Mistral) byte tokens favoured."""
    edges = [0, 1, 2, 3, 4, 130, 200, 258, 259] if name == "mistral-v1" else [0, 50256, 220, 198]
    return st.one_of(st.integers(0, VOCAB[name] - 1), st.sampled_from(edges))


@fuzz_settings(80)
@given(st.data(), st.sampled_from(["gpt2", "mistral-v1"]), st.integers(1, MAX_SEQUENCES))
def test_random_student_completions_are_scored_with_consistent_shapes(app, students, data, name, n):
    """Random in-vocabulary ids (specials, lone byte tokens, broken UTF-8 included) after random
    prompts: always a 200 whose arrays line up with the completion."""
    completions = [data.draw(st.lists(in_vocab_ids(name), max_size=24)) for _ in range(n)]
    prompts = [
        data.draw(
            st.one_of(
                st.fixed_dictionaries({"text": ODD_TEXT}),
                st.fixed_dictionaries({"ids": st.lists(in_vocab_ids(name), max_size=8)}),
            )
        )
        for _ in range(n)
    ]
    body = {
        "student_tokenizer": students[name],
        "top_k": data.draw(st.integers(1, MAX_TOP_K)),
        "sequences": [
            {"prompt": p, "completion_ids": c} for p, c in zip(prompts, completions, strict=True)
        ],
    }
    response = post(app, "/v1/score", body, data.draw(st.sampled_from(["msgpack", "json"])))
    assert_scored(response, completions, VOCAB[name])


def test_empty_completions_and_empty_prompts_are_scored(app, students):
    for name, student in students.items():
        body = {
            "student_tokenizer": student,
            "top_k": MAX_TOP_K,
            "sequences": [
                {"prompt": {"text": ""}, "completion_ids": []},
                {"prompt": {"ids": []}, "completion_ids": []},
                {"prompt": {"text": ""}, "completion_ids": [5]},
                {"prompt": {"ids": []}, "completion_ids": [5, 6]},
            ],
        }
        for encoding in ("msgpack", "json"):
            response = post(app, "/v1/score", body, encoding)
            assert_scored(response, [[], [], [5], [5, 6]], VOCAB[name])


@fuzz_settings(40)
@given(st.text(min_size=1, max_size=300))
def test_unicode_prompts_are_scored(app, students, text):
    for encoding in ("msgpack", "json"):
        body = score_body(students["mistral-v1"])
        body["sequences"][0]["prompt"] = {"text": text}
        assert_scored(post(app, "/v1/score", body, encoding), [[5, 6, 7]], VOCAB["mistral-v1"])


def test_messages_need_a_teacher_chat_template(app, students):
    body = score_body(students["gpt2"])
    body["sequences"][0]["prompt"] = {"messages": [{"role": "user", "content": "hi\x00"}]}
    assert_clean_refusal(post(app, "/v1/score", body), (422,), "chat template")


# -- limits ------------------------------------------------------------------------------------


def test_sizes_above_the_limits_are_413_with_the_limit(app, students):
    student = students["gpt2"]
    long_ids = score_body(student, completion=[1000] * 1100)
    many = {**score_body(student), "sequences": score_body(student)["sequences"] * 9}
    prompts = {"prompts": [{"text": "a"}] * (MAX_SEQUENCES + 1), "max_tokens": 1}
    cases = [
        ("/v1/score", long_ids, "max_model_len"),
        ("/v1/score", many, "max_sequences"),
        ("/v1/generate", prompts, "max_sequences"),
    ]
    for route, body, needle in cases:
        for encoding in ("msgpack", "json"):
            assert_clean_refusal(post(app, route, body, encoding), (413,), needle)


def test_huge_bodies_are_413_declared_or_streamed(app, students):
    big = score_body(students["gpt2"], completion=[7] * (MAX_BODY_BYTES + 1))
    wire = pack(big)
    assert len(wire) > MAX_BODY_BYTES
    assert_clean_refusal(
        send(app, "POST", "/v1/score", content=wire, headers=MSGPACK), (413,), "max_body_bytes"
    )

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: the limit holds as it streams
        for start in range(0, len(wire), 65536):
            yield wire[start : start + 65536]

    streamed = send(app, "POST", "/v1/score", content=chunks(), headers=MSGPACK)
    assert "content-length" not in streamed.request.headers
    assert_clean_refusal(streamed, (413,), "max_body_bytes")
    lying = send(
        app, "POST", "/v1/score", content=b"{}", headers={**JSON, "content-length": "9" * 30}
    )
    assert lying.status_code in (400, 413, 422)


def test_limits_on_values_name_the_maximum(app, students):
    top_k = score_body(students["gpt2"], top_k=MAX_TOP_K + 1)
    assert_clean_refusal(post(app, "/v1/score", top_k), (422,), f"maximum {MAX_TOP_K}")
    tokens = {"prompts": [{"text": "a"}], "max_tokens": MAX_GENERATE_TOKENS + 1}
    assert_clean_refusal(post(app, "/v1/generate", tokens), (422,), "max_generate_tokens")


# -- headers -----------------------------------------------------------------------------------


def latin1(text: str) -> bytes:
    """A header value as it travels (HTTP headers are bytes; httpx takes str only in ASCII)."""
    return text.encode("latin-1")


HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)


@fuzz_settings(120)
@given(st.sampled_from(BODY_ROUTES), HEADER_TEXT)
def test_any_content_type_is_decoded_or_refused(app, students, route, content_type):
    body = pack(valid_body(route, students), "application/json")
    response = send(
        app, "POST", route, content=body, headers={**AUTH, "content-type": latin1(content_type)}
    )
    media = content_type.split(";")[0].strip().lower()
    msgpack_types = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
    is_json = media == "application/json" or media.endswith("+json")
    if media and not is_json and media not in msgpack_types:
        assert_clean_refusal(response, (415,), "not supported")
        return
    ok_or_refused(response)


@fuzz_settings(60)
@given(HEADER_TEXT)
def test_any_accept_header_gets_a_readable_answer(app, students, accept):
    good = send(app, "GET", "/v1/info", headers={**AUTH, "accept": latin1(accept)})
    assert good.status_code == 200
    assert isinstance(body_of(good), dict)
    refused = send(
        app, "POST", "/v1/score", content=b"\xc1", headers={**MSGPACK, "accept": latin1(accept)}
    )
    assert_clean_refusal(refused, (400,))


@fuzz_settings(120)
@given(st.sampled_from(GUARDED), st.one_of(st.none(), HEADER_TEXT))
def test_without_the_key_every_route_but_liveness_is_401_or_403(app, route, authorization):
    method, path = route
    headers = {"content-type": b"application/json"}
    if authorization is not None:
        headers["authorization"] = latin1(authorization)
    response = send(app, method, path, content=b'{"x": 1}', headers=headers)
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        assert_clean_refusal(response, (403,), "not valid")
    else:
        assert_clean_refusal(response, (401,), "Bearer")
        assert response.headers["www-authenticate"] == "Bearer"
    assert send(app, "GET", "/healthz").status_code == 200


@fuzz_settings(100)
@given(st.one_of(ODD_TEXT, st.sampled_from(["..", "../..", "%2e%2e", "a/../b", ".", "\x00", "~"])))
def test_unknown_student_ids_are_404_on_every_route(app, students, student_id):
    for method in ("GET", "DELETE"):
        path = "/v1/tokenizers/" + quote(student_id, safe="")
        response = send(app, method, path, headers=AUTH)
        if student_id not in ("", ".", "..") and "/" not in student_id:
            assert_clean_refusal(response, (404,), "")
        else:  # '', '.', '..' or a '/' (%2F, decoded) route elsewhere: a redirect or a refusal
            assert response.status_code < 500
    if 1 <= len(student_id) <= 128:
        response = post(app, "/v1/score", score_body(student_id))
        assert_clean_refusal(response, (404,), "POST /v1/tokenizers")
    listed = body_of(send(app, "GET", "/v1/tokenizers", headers=AUTH))["tokenizers"]
    assert {t["id"] for t in listed} >= set(students.values())


def test_unknown_routes_and_methods_are_refused_with_the_error_body(app):
    assert_clean_refusal(send(app, "GET", "/v2/score", headers=AUTH), (404,))
    refused = send(app, "PATCH", "/v1/score", headers=AUTH)
    assert_clean_refusal(refused, (405,))
    assert "POST" in refused.headers["allow"]
    assert body_of(refused)["error"]["code"] == "method_not_allowed"


# -- after all of it ---------------------------------------------------------------------------


def test_the_service_still_serves_the_teachers_numbers(app, students, bank, teacher_dir):
    tokenizer = bank.tokenizer("gpt2")
    prompt_ids = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(" To be, or not to be", add_special_tokens=False)
    response = post(app, "/v1/score", score_body(students["gpt2"], ids, top_k=8), "json")
    assert_scored(response, [ids], VOCAB["gpt2"])
    (seq,) = [ScoredSequence.from_wire(s, 8) for s in body_of(response)["sequences"]]
    forward = direct_logprobs(teacher_dir, prompt_ids + ids)
    start = len(prompt_ids)
    expected = forward[np.arange(start - 1, start - 1 + len(ids)), ids]
    np.testing.assert_allclose(seq.logprobs_S, expected, rtol=0, atol=2e-5)
    assert send(app, "GET", "/readyz", headers=AUTH).status_code == 200
    listed = body_of(send(app, "GET", "/v1/tokenizers", headers=AUTH))["tokenizers"]
    assert {t["id"] for t in listed} >= set(students.values())
