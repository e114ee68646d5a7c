"""The vLLM-compatible face through the real app (``docs/vllm-face.md``): ``/v1/models`` lists
every (teacher, student) pair, a pair's base URL behaves as a single-model ``vllm serve``, and
``/v1/completions`` answers ``prompt_logprobs`` with exactly ``/v1/score``'s numbers over the
student's vocabulary; every field it cannot honour is refused by name; keys (Bearer, or Basic as
a URL's credentials send them) and metrics apply as for ``/v1/score``."""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import MSGPACK, pack, unpack
from tokenbridge.shared.protocol import COMPLETION_NEUTRAL_FIELDS, ScoredSequence

from tests.support.service import config_for, running_app

pytestmark = pytest.mark.integration

KEY = "face-key-0123456789"
TEXT = "To be, or not to be: that is the question 1601."
K = 5


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("face"), max_top_k=16, api_keys=(KEY,))
    with running_app(config, loop=loop) as harness:
        yield harness


BEARER = {"authorization": f"Bearer {KEY}"}


def _call(app, method: str, path: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", BEARER)

    async def go(client: httpx.AsyncClient) -> httpx.Response:
        return await client.request(method, path, **kwargs)

    return app.run(go)


def _register(app, name: str) -> str:
    answer = _call(app, "POST", "/v1/tokenizers", json={"name": name, "hub": name})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["id"]


@pytest.fixture(scope="module")
def students(app) -> dict[str, str]:
    return {name: _register(app, name) for name in ("mistral-v1", "gpt2")}


def _ids(bank, name: str, text: str = TEXT) -> list[int]:
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    bos = vocab.roles.get("bos")
    ids = encode_continuation(tokenizer, vocab, text)
    return ([bos] if bos is not None else []) + list(ids)


def _score(app, student: str, ids: list[int], lead: int, candidates=None) -> ScoredSequence:
    sequence: dict[str, Any] = {"prompt": {"text": ""}, "completion_ids": ids[lead:]}
    if candidates is not None:
        sequence["candidate_ids"] = candidates[lead:]
    body = {"student_tokenizer": student, "top_k": K, "sequences": [sequence]}
    answer = _call(app, "POST", "/v1/score", json=body)
    assert answer.status_code == 200, answer.text
    return ScoredSequence.from_wire(answer.json()["sequences"][0], K)


def test_models_name_every_pair_and_the_teachers_own_tokenizer_plainly(app, students):
    listed = _call(app, "GET", "/v1/models")
    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    names = {card["id"]: card for card in listed.json()["data"]}
    assert names.keys() == {f"default@{students['mistral-v1']}", "default"}
    card = names[f"default@{students['mistral-v1']}"]
    assert card["object"] == "model" and card["owned_by"] == "tokenbridge"
    assert card["tokenbridge"]["base_url"] == f"/vllm/default/{students['mistral-v1']}"
    # The base URL is a single-model server: its health and its one model.
    base = card["tokenbridge"]["base_url"]
    health = _call(app, "GET", base + "/health")
    assert health.status_code == 200 and health.content == b""
    one = _call(app, "GET", base + "/v1/models").json()
    assert [c["id"] for c in one["data"]] == [card["id"]]
    missing = _call(app, "GET", "/vllm/default/nobody/health")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize("student_name", ["mistral-v1", "gpt2"])
def test_completions_give_the_numbers_of_v1_score(app, bank, students, student_name):
    student = students[student_name]
    ids = _ids(bank, student_name)
    short = ids[:7]
    body = {"prompt": [ids, short], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
    answer = _call(app, "POST", f"/vllm/default/{student}/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["object"] == "text_completion" and len(got["choices"]) == 2
    assert got["usage"]["prompt_tokens"] == len(ids) + len(short)
    assert got["tokenbridge"]["usage"]["positions"] > 0
    vocab = bank.vocab(student_name)
    lead = 1 if ids[0] == vocab.roles.get("bos") else 0
    for choice, sent in zip(got["choices"], (ids, short), strict=True):
        scored = _score(app, student, sent, lead)
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(sent) and positions[0] is None
        for i in range(1, len(sent)):
            entry, row = positions[i], i - lead
            realised = entry[str(sent[i])]
            assert realised["logprob"] == pytest.approx(float(scored.logprobs_S[row]), abs=1e-6)
            listed = [
                (int(t), float(v))
                for t, v in zip(scored.topk_ids_SK[row], scored.topk_logprobs_SK[row], strict=True)
                if t >= 0
            ]
            for rank, (token, value) in enumerate(listed, start=1):
                mine = entry[str(token)]
                assert mine["rank"] == rank
                if token != sent[i]:
                    assert mine["logprob"] == pytest.approx(value, abs=1e-6)
            if sent[i] not in [t for t, _ in listed]:
                assert realised["rank"] == len(listed) + 1
            assert set(entry) == {str(t) for t, _ in listed} | {str(sent[i])}
            assert all(math.isfinite(e["logprob"]) for e in entry.values())


def test_trls_reading_of_the_answer_is_the_sparse_row_sorted(app, bank, students):
    """What TRL's ``VLLMClient._format_sequence_logprobs`` does with a choice: sort by rank, keep
    K; those must be /v1/score's top-K, most likely first."""
    student = students["mistral-v1"]
    ids = _ids(bank, "mistral-v1")
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": K}
    choice = _call(app, "POST", f"/vllm/default/{student}/v1/completions", json=body).json()[
        "choices"
    ][0]
    scored = _score(app, student, ids, 1)
    for i in range(1, len(ids)):
        kept = sorted(choice["prompt_logprobs"][i].items(), key=lambda kv: kv[1]["rank"])[:K]
        want = [int(t) for t in scored.topk_ids_SK[i - 1] if t >= 0]
        assert [int(t) for t, _ in kept][: len(want)] == want


def test_msgpack_and_json_answers_agree_and_model_may_be_named_at_the_top(app, bank, students):
    student = students["mistral-v1"]
    ids = _ids(bank, "mistral-v1")
    body = {"model": f"default@{student}", "prompt": [ids], "max_tokens": 0, "prompt_logprobs": 3}
    as_json = _call(app, "POST", "/v1/completions", json=body)
    as_msgpack = _call(
        app,
        "POST",
        "/v1/completions",
        content=pack(body),
        headers={**BEARER, "content-type": MSGPACK},
    )
    assert as_json.status_code == as_msgpack.status_code == 200
    assert as_msgpack.headers["content-type"] == MSGPACK
    a, b = as_json.json(), unpack(as_msgpack.content)
    assert a["choices"][0]["prompt_logprobs"] == b["choices"][0]["prompt_logprobs"]
    assert a["model"] == f"default@{student}"


def test_prompt_logprobs_zero_gives_the_realised_token_alone(app, bank, students):
    student = students["mistral-v1"]
    ids = _ids(bank, "mistral-v1")
    body = {
        "prompt": ids,
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    got = _call(app, "POST", f"/vllm/default/{student}/v1/completions", json=body).json()
    for i, entry in enumerate(got["choices"][0]["prompt_logprobs"][1:], start=1):
        assert list(entry) == [str(ids[i])]
        assert entry[str(ids[i])]["decoded_token"] == f"token_id:{ids[i]}"


def test_named_student_tokens_get_their_full_row_mass(app, bank, students):
    """The extension ``prompt_logprob_token_ids``: each named id's log-prob from the teacher's
    full row, the numbers /v1/score's ``candidate_ids`` gives."""
    student = students["mistral-v1"]
    ids = _ids(bank, "mistral-v1")
    rng = np.random.default_rng(0)
    rows = rng.integers(3, bank.vocab("mistral-v1").size, size=(len(ids), 6)).tolist()
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "prompt_logprob_token_ids": rows}
    got = _call(app, "POST", f"/vllm/default/{student}/v1/completions", json=body)
    assert got.status_code == 200, got.text
    positions = got.json()["choices"][0]["prompt_logprobs"]
    scored = _score(app, student, ids, 1, candidates=rows)
    assert scored.candidate_logprobs_SC is not None
    for i in range(1, len(ids)):
        for token, value in zip(rows[i], scored.candidate_logprobs_SC[i - 1], strict=True):
            if token == ids[i] or not np.isfinite(value):
                continue
            assert positions[i][str(token)]["logprob"] == pytest.approx(float(value), abs=1e-6)


REFUSED = {
    "n": 2,
    "echo": True,
    "stream": True,
    "logprobs": 3,
    "top_p": 0.5,
    "stop": ["\n"],
    "logit_bias": {"5": 1.0},
    "use_beam_search": True,
    "truncate_prompt_tokens": 4,
    "logprob_token_ids": [5],
}


@pytest.mark.parametrize(("field", "value"), sorted(REFUSED.items()))
def test_every_field_that_would_change_the_answer_is_refused_by_name(
    app, bank, students, field, value
):
    assert field in COMPLETION_NEUTRAL_FIELDS
    body = {"prompt": _ids(bank, "mistral-v1")[:5], "max_tokens": 1, "prompt_logprobs": 2}
    path = f"/vllm/default/{students['mistral-v1']}/v1/completions"
    ok = _call(app, "POST", path, json={**body, field: COMPLETION_NEUTRAL_FIELDS[field][0]})
    assert ok.status_code == 200, ok.text
    refused = _call(app, "POST", path, json={**body, field: value})
    assert 400 <= refused.status_code < 500
    error = refused.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["code"] == refused.status_code


@pytest.mark.parametrize(
    ("change", "param", "status"),
    [
        ({"prompt_logprobs": 17}, "prompt_logprobs", 400),
        ({"prompt_logprobs": None}, "prompt_logprobs", 422),
        ({"prompt_logprobs": -1}, "prompt_logprobs", 422),
        ({"max_tokens": 16}, "max_tokens", 422),
        ({"prompt": "To be"}, "prompt", 422),
        ({"prompt": [[]]}, "prompt", 422),
        ({"model": "default@nobody"}, "model", 404),
        ({"frobnicate": 1}, "frobnicate", 422),
    ],
)
def test_bad_requests_get_vllm_style_errors_naming_the_field(
    app, bank, students, change, param, status
):
    body = {"prompt": _ids(bank, "mistral-v1")[:5], "max_tokens": 1, "prompt_logprobs": 2}
    body.update(change)
    refused = _call(
        app, "POST", f"/vllm/default/{students['mistral-v1']}/v1/completions", json=body
    )
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["param"] == param


def test_keys_apply_and_a_urls_credentials_are_a_key(app, students):
    base = f"/vllm/default/{students['mistral-v1']}"
    assert _call(app, "GET", base + "/v1/models", headers={}).status_code == 401
    assert _call(app, "GET", "/v1/models", headers={}).json()["error"]["code"] == 401
    wrong = _call(app, "GET", base + "/v1/models", headers={}, auth=("trl", "nope"))
    assert wrong.status_code == 403
    right = _call(app, "GET", base + "/v1/models", headers={}, auth=("trl", KEY))
    assert right.status_code == 200


def test_metrics_count_the_face_like_score(app, bank, students):
    def counted() -> tuple[float, float]:
        text = _call(app, "GET", "/metrics").text
        positions = requests = 0.0
        for line in text.splitlines():
            if line.startswith('tokenbridge_scored_positions_total{teacher="default"}'):
                positions = float(line.split()[-1])
            if line.startswith("tokenbridge_requests_total{") and (
                'route="/vllm/{teacher}/{student}/v1/completions"' in line
                and 'status="200"' in line
            ):
                requests += float(line.split()[-1])
        return positions, requests

    before = counted()
    ids = _ids(bank, "mistral-v1")
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1}
    answer = _call(app, "POST", f"/vllm/default/{students['mistral-v1']}/v1/completions", json=body)
    assert answer.status_code == 200
    after = counted()
    assert after[0] - before[0] == len(ids) - 1
    assert after[1] - before[1] == 1


# -- chat templates: the conversation re-rendered in the teacher's own ----------------------------

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And 4+4?"},
]


@pytest.fixture(scope="module")
def chat_app(tmp_path_factory, loop):
    """A teacher with a chat template (a tiny Llama over Qwen2's tokenizer)."""
    from tests.support.service import tiny_teacher

    teacher = tiny_teacher("qwen2", "llama", hidden=64, layers=2, heads=2)
    config = config_for(teacher, tmp_path_factory.mktemp("chat"), max_top_k=16, api_keys=(KEY,))
    with running_app(config, loop=loop) as harness:
        yield harness


def _chat_ids(bank, name: str, reply: str) -> tuple[list[int], int]:
    """The student's ids of ``MESSAGES`` in its own template and a reply; where the reply starts."""
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    head = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    return head + encode_continuation(tokenizer, vocab, reply) + [vocab.roles["eot"]], len(head)


def test_a_conversation_is_re_rendered_in_the_teachers_template(chat_app, bank):
    student = _register(chat_app, "llama3")
    ids, reply = _chat_ids(bank, "llama3", "It is 8, since 4+4=8.")
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": K}
    got = _call(chat_app, "POST", f"/vllm/default/{student}/v1/completions", json=body)
    assert got.status_code == 200, got.text
    answer = got.json()
    assert answer["tokenbridge"]["chat_template"] == ["re_rendered"]
    positions = answer["choices"][0]["prompt_logprobs"]
    # The reply: /v1/score's rows for the conversation as messages (the teacher's template).
    scored = _post_score(chat_app, student, {"messages": MESSAGES}, ids[reply:])
    for i in range(reply, len(ids)):
        value = positions[i][str(ids[i])]["logprob"]
        assert value == pytest.approx(float(scored.logprobs_S[i - reply]), abs=1e-6)
    # Before it: the ids as any are scored (the student's BOS left out).
    before = _post_score(chat_app, student, {"text": ""}, ids[1:reply])
    for i in range(1, reply):
        want = float(before.logprobs_S[i - 1])
        if math.isnan(want):  # a special with no teacher counterpart: no log-prob to give
            assert str(ids[i]) not in positions[i]
            continue
        assert positions[i][str(ids[i])]["logprob"] == pytest.approx(want, abs=1e-6)
    # And the teacher's context differs from the role-matched reading of the same ids.
    plain = _post_score(chat_app, student, {"text": ""}, ids[1:])
    assert not np.allclose(plain.logprobs_S[reply - 1 :], scored.logprobs_S, atol=1e-3)


def test_ids_that_are_no_readable_conversation_fall_back_to_roles(chat_app, bank):
    student = _register(chat_app, "llama3")
    ids, _ = _chat_ids(bank, "llama3", "It is 8.")
    # The first header's opening marker dropped: no shape of the template matches, so the
    # specials are matched by role.
    assert bank.tokenizer("llama3").convert_ids_to_tokens(ids[1]) == "<|start_header_id|>"
    cut = ids[:1] + ids[2:]
    body = {"prompt": [cut, _ids(bank, "llama3")], "max_tokens": 1, "prompt_logprobs": 2}
    got = _call(chat_app, "POST", f"/vllm/default/{student}/v1/completions", json=body).json()
    assert got["tokenbridge"]["chat_template"] == ["specials_matched_by_role", "no_specials"]


def _post_score(app, student: str, prompt: dict[str, Any], ids: list[int]) -> ScoredSequence:
    body = {
        "student_tokenizer": student,
        "top_k": K,
        "sequences": [{"prompt": prompt, "completion_ids": ids}],
    }
    answer = _call(app, "POST", "/v1/score", json=body)
    assert answer.status_code == 200, answer.text
    return ScoredSequence.from_wire(answer.json()["sequences"][0], K)


def test_the_keys_token_quota_charges_the_face(teacher_dir, tmp_path, bank):
    """Teacher tokens spent through the face count against the key's quota as through
    /v1/score: past it, a 429 with Retry-After in vLLM's error layout."""
    from hashlib import sha256

    key_id = sha256(KEY.encode()).hexdigest()[:8]
    config = config_for(teacher_dir, tmp_path, api_keys=(KEY,), key_quotas=(f"{key_id}=60",))
    ids = _ids(bank, "mistral-v1", TEXT * 5)
    with running_app(config) as harness:
        student = _register(harness, "mistral-v1")
        path = f"/vllm/default/{student}/v1/completions"
        body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1}
        first = _call(harness, "POST", path, json=body)
        refused = _call(harness, "POST", path, json=body)
    assert first.status_code == 200, first.text
    assert first.json()["tokenbridge"]["usage"]["teacher_tokens"] > 60
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["type"] == "TooManyRequestsError"
