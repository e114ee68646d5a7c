"""The real app in-process (``httpx.ASGITransport``) on the transformers engine and a tiny GPT-2
teacher: every route, golden numbers against a direct forward, both encodings, every error path."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tokenbridge.shared.codec import pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import (
    GatedEngine,
    config_for,
    direct_logprobs,
    running_app,
    transformers_engine,
)

pytestmark = pytest.mark.integration

MSGPACK = {"content-type": "application/msgpack"}
JSON_ACCEPT = {"accept": "application/json"}
PROMPT = "HAMLET.\n"
TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats 🎭 to the king."


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("data"), max_top_k=32)
    with running_app(config, loop=loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def students(app):
    """Register the teacher's own tokenizer and a Mistral SentencePiece student."""

    async def register(client):
        ids = {}
        for name in ("gpt2", "mistral-v1"):
            response = await client.post("/v1/tokenizers", json={"name": name, "hub": name})
            assert response.status_code in (200, 201), response.text
            ids[name] = response.json()["id"]
        return ids

    return app.run(register)


def completion(bank, name, text=TEXT):
    from tokenbridge.shared.align import encode_continuation

    return encode_continuation(bank.tokenizer(name), bank.vocab(name), text)


def score(app, body, encoding="msgpack"):
    async def go(client):
        if encoding == "msgpack":
            return await client.post("/v1/score", content=pack(body), headers=MSGPACK)
        return await client.post("/v1/score", json=body, headers=JSON_ACCEPT)

    return app.run(go)


def scored(response):
    assert response.status_code == 200, response.content[:500]
    if response.headers["content-type"].startswith("application/json"):
        body = response.json()
    else:
        body = unpack(response.content)
    return body, [ScoredSequence.from_wire(s, body["top_k"]) for s in body["sequences"]]


# -- liveness, readiness, info, metrics ---------------------------------------------------------


def test_health_ready_info(app, students):
    async def go(client):
        return (
            await client.get("/healthz"),
            await client.get("/readyz"),
            await client.get("/v1/info", headers=JSON_ACCEPT),
            await client.get("/v1/info"),
        )

    health, ready, info_json, info_msgpack = app.run(go)
    assert health.status_code == 200 and health.json()["status"] == "alive"
    assert ready.status_code == 200 and ready.json() == {
        "ready": True,
        "state": "ready",
        "teachers": {"default": {"ready": True, "state": "ready"}},
        "unready": [],
    }
    info = info_json.json()
    assert info_msgpack.headers["content-type"] == "application/msgpack"
    assert unpack(info_msgpack.content) == info
    teacher = info["teacher"]
    assert teacher["backend"] == "transformers" and teacher["vocab_size"] == 50257
    assert teacher["dtype"] == "float32" and teacher["versions"]["torch"]
    assert len(teacher["vocab_hash"]) == 32
    assert info["max_top_k"] == 32
    assert info["logprobs"]["temperature"] == 1.0
    assert info["limits"]["max_model_len"] == 1024
    assert info["students"] >= 2


def test_metrics_count_requests_and_positions(app, students, bank):
    ids = completion(bank, "mistral-v1")
    body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 4,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
    }
    scored(score(app, body))

    async def go(client):
        return (await client.get("/metrics")).text

    text = app.run(go)
    assert 'tokenbridge_requests_total{route="/v1/score",status="200",teacher="default"}' in text
    positions = [
        line for line in text.splitlines() if line.startswith("tokenbridge_scored_positions_total")
    ]
    assert positions and float(positions[0].split()[-1]) >= len(ids)
    for name in (
        "tokenbridge_request_seconds",
        "tokenbridge_payload_bytes",
        "tokenbridge_stage_seconds",
        "tokenbridge_tokens_in_flight",
    ):
        assert name in text


# -- golden numbers -----------------------------------------------------------------------------


def test_identical_tokenizers_return_the_teachers_own_numbers(app, students, bank, teacher_dir):
    """Same tokenizer on both sides: logprobs and top-K are the teacher's, and row j is token j."""
    tokenizer = bank.tokenizer("gpt2")
    prompt_ids = tokenizer.encode(PROMPT)
    ids = completion(bank, "gpt2")
    body = {
        "student_tokenizer": students["gpt2"],
        "top_k": 8,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
    }
    _, (seq,) = scored(score(app, body))
    forward = direct_logprobs(teacher_dir, prompt_ids + ids)
    start = len(prompt_ids)
    rows = forward[start - 1 : start - 1 + len(ids)]
    expected = rows[np.arange(len(ids)), ids]
    # Row j is about completion token j given everything before it: the off-by-one pinned.
    np.testing.assert_allclose(seq.logprobs_S, expected, rtol=0, atol=2e-5)
    shifted = forward[start : start + len(ids) - 1][np.arange(len(ids) - 1), ids[1:]]
    assert not np.allclose(seq.logprobs_S[:-1], shifted, atol=1e-3)
    top = np.argsort(-rows, axis=1)[:, :8]
    agree = (seq.topk_ids_SK == top).mean()
    assert agree > 0.99  # ties between near-equal random logits may swap
    np.testing.assert_allclose(
        seq.topk_logprobs_SK, np.take_along_axis(rows, seq.topk_ids_SK, 1), atol=0.01
    )
    assert seq.exact_S.all()
    assert np.array_equal(seq.chunk_ids_S, np.arange(len(ids)))
    np.testing.assert_allclose(seq.chunk_logprobs_C, expected, atol=2e-5)


def test_cross_family_logprobs_match_a_direct_forward(app, students, bank, teacher_dir):
    """GPT-2 teacher, Mistral SentencePiece student: chunk sums are the teacher's path log-probs."""
    teacher_tok = bank.tokenizer("gpt2")
    prompt_ids = teacher_tok.encode(PROMPT)
    student_ids = completion(bank, "mistral-v1")
    teacher_ids = completion(bank, "gpt2")
    body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 16,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": student_ids}],
    }
    response_body, (seq,) = scored(score(app, body))
    forward = direct_logprobs(teacher_dir, prompt_ids + teacher_ids)
    start = len(prompt_ids)
    path = forward[np.arange(start - 1, start - 1 + len(teacher_ids)), teacher_ids]
    assert len(seq.logprobs_S) == len(student_ids)
    assert np.isfinite(seq.logprobs_S).all()
    # Over the whole completion the telescoped log-probs add up to the teacher's log-prob.
    assert seq.logprobs_S.sum() == pytest.approx(path.sum(), abs=1e-3)
    assert seq.chunk_logprobs_C.sum() == pytest.approx(path.sum(), abs=1e-3)
    chunk_sums = np.bincount(seq.chunk_ids_S, weights=seq.logprobs_S)
    np.testing.assert_allclose(chunk_sums, seq.chunk_logprobs_C, atol=1e-4)
    alignment = response_body["sequences"][0]["alignment"]
    assert alignment["teacher_completion_tokens"] == len(teacher_ids)
    assert alignment["teacher_prompt_tokens"] == len(prompt_ids)
    assert alignment["untiled_bytes"] == 0 and 0 < alignment["one_to_one_share"] <= 1
    assert response_body["usage"]["positions"] == len(student_ids)
    assert response_body["usage"]["teacher_tokens"] == len(prompt_ids) + len(teacher_ids)
    assert set(response_body["timings"]) == {"prepare_s", "engine_s", "mapping_s"}
    assert response_body["teacher"]["backend"] == "transformers"
    # Sparse rows: valid student ids or padding, probabilities within [0, 1].
    ids = seq.topk_ids_SK
    assert ((ids == -1) | ((ids >= 0) & (ids < 32000))).all()
    total = np.exp(seq.topk_logprobs_SK.astype(np.float64)).sum(axis=1)
    assert (total <= 1 + 1e-2).all()
    assert ((seq.tail_mass_S >= 0) & (seq.tail_mass_S <= 1)).all()


def test_msgpack_and_json_give_the_same_numbers(app, students, bank):
    body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 5,
        "sequences": [
            {"prompt": {"text": PROMPT}, "completion_ids": completion(bank, "mistral-v1")},
            {"prompt": {"text": "x"}, "completion_ids": []},
        ],
    }
    packed_body, packed = scored(score(app, body, "msgpack"))
    json_body, as_json = scored(score(app, body, "json"))
    assert set(packed_body["sequences"][0]) == set(json_body["sequences"][0])
    for a, b in zip(packed, as_json, strict=True):
        for name in (
            "logprobs_S",
            "topk_ids_SK",
            "topk_logprobs_SK",
            "chunk_ids_S",
            "tail_mass_S",
            "unresolved_mass_S",
            "exact_S",
            "chunk_logprobs_C",
        ):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert len(packed[1].logprobs_S) == 0


def test_sequences_come_back_in_request_order_under_concurrency(app, students, bank):
    texts = ["Hello there.", TEXT, "A", "Numbers 1234567 and more numbers 89.", "\n\n  indented"]
    sequences = [
        {"prompt": {"text": PROMPT}, "completion_ids": completion(bank, "mistral-v1", t)}
        for t in texts
    ]
    body = {"student_tokenizer": students["mistral-v1"], "top_k": 4, "sequences": sequences}
    _, together = scored(score(app, body))
    for sequence, one in zip(sequences, together, strict=True):
        assert len(one.logprobs_S) == len(sequence["completion_ids"])

    async def concurrent(client):
        requests = [
            client.post("/v1/score", content=pack({**body, "sequences": [s]}), headers=MSGPACK)
            for s in sequences
        ]
        return await asyncio.gather(*requests)

    for response, whole in zip(app.run(concurrent), together, strict=True):
        _, (alone,) = scored(response)
        np.testing.assert_allclose(alone.logprobs_S, whole.logprobs_S, atol=1e-5)
        np.testing.assert_array_equal(alone.topk_ids_SK, whole.topk_ids_SK)


def test_prompt_forms_render_for_the_teacher(app, students, bank):
    """ids are decoded with the student tokenizer and re-tokenised: same as sending the text."""
    mistral = bank.tokenizer("mistral-v1")
    ids = completion(bank, "mistral-v1")
    prompt_ids = mistral.encode(PROMPT, add_special_tokens=True)
    as_text = {"prompt": {"text": PROMPT}, "completion_ids": ids}
    as_ids = {"prompt": {"ids": prompt_ids}, "completion_ids": ids}
    body = {"student_tokenizer": students["mistral-v1"], "top_k": 3, "sequences": [as_text, as_ids]}
    _, (a, b) = scored(score(app, body))
    np.testing.assert_allclose(a.logprobs_S, b.logprobs_S, atol=1e-6)
    # GPT-2 has no chat template: messages are refused with the reason.
    messages = {"prompt": {"messages": [{"role": "user", "content": "hi"}]}, "completion_ids": ids}
    response = score(app, {**body, "sequences": [messages]}, "json")
    assert response.status_code == 422 and "chat template" in response.json()["error"]["message"]


# -- registry -----------------------------------------------------------------------------------


def test_registry_is_idempotent_and_inspectable(app, students):
    async def go(client):
        again = await client.post(
            "/v1/tokenizers", json={"name": "other-name", "hub": "mistral-v1"}
        )
        listing = await client.get("/v1/tokenizers", headers=JSON_ACCEPT)
        detail = await client.get(f"/v1/tokenizers/{students['mistral-v1']}", headers=JSON_ACCEPT)
        missing = await client.get("/v1/tokenizers/nope", headers=JSON_ACCEPT)
        return again, listing, detail, missing

    again, listing, detail, missing = app.run(go)
    assert again.status_code == 200 and again.json()["id"] == students["mistral-v1"]
    assert again.json()["created"] is False
    listed = {t["id"] for t in listing.json()["tokenizers"]}
    assert set(students.values()) <= listed
    described = detail.json()
    assert described["vocab_size"] == 32000 and described["scheme"] == "sentencepiece"
    assert 0.3 < described["vocab_overlap"] < 1 and 0 < described["probe_one_to_one_share"] < 1
    assert described["roles"]["eos"] == 2
    assert (
        missing.status_code == 404 and "POST /v1/tokenizers" in missing.json()["error"]["message"]
    )


def test_register_upload_and_delete(app, bank):
    tokenizer = bank.tokenizer("llama3")
    body = {
        "name": "uploaded",
        "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
        "special_tokens": {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"},
    }

    async def go(client):
        created = await client.post("/v1/tokenizers", content=pack(body), headers=MSGPACK)
        student_id = unpack(created.content)["id"]
        deleted = await client.delete(f"/v1/tokenizers/{student_id}")
        gone = await client.get(f"/v1/tokenizers/{student_id}")
        return created, deleted, gone

    created, deleted, gone = app.run(go)
    assert created.status_code == 201
    described = unpack(created.content)
    assert (
        described["vocab_size"] == len(tokenizer)
        and described["source"]["kind"] == "tokenizer_json"
    )
    assert deleted.status_code == 200 and unpack(deleted.content)["deleted"] is True
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "x", "tokenizer_json": "{not json"}, 422, "cannot load the tokenizer"),
        ({"name": "x", "path": "/definitely/not/here"}, 422, "outside"),
        ({"name": "x", "path": "not/here"}, 422, "not a folder"),
        ({"name": "x", "hub": "../gpt2"}, 422, "not a hub repository id"),
        ({"name": "x", "path": "/tmp", "hub": "gpt2"}, 422, "exactly one"),
        ({"name": "x"}, 422, "exactly one"),
        ({"name": "x", "hub": "gpt2", "colour": "red"}, 422, "colour"),
    ],
)
def test_bad_registrations_are_422_with_the_reason(app, body, status, needle):
    async def go(client):
        return await client.post("/v1/tokenizers", json=body)

    response = app.run(go)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_non_generative_tokenizer_is_refused(app):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()

    async def go(client):
        return await client.post(
            "/v1/tokenizers", json={"name": "bert-ish", "tokenizer_json": wordpiece.to_str()}
        )

    response = app.run(go)
    assert response.status_code == 422
    assert (
        "cannot be mapped" in response.json()["error"]["message"]
        or "not generative" in response.json()["error"]["message"]
    )


# -- errors -------------------------------------------------------------------------------------


def _error(response):
    body = (
        response.json() if "json" in response.headers["content-type"] else unpack(response.content)
    )
    return body["error"]["message"]


def test_request_errors_have_status_and_reason(app, students, bank):
    student = students["mistral-v1"]
    ids = completion(bank, "mistral-v1")
    good = {
        "student_tokenizer": student,
        "top_k": 4,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
    }

    async def go(client):
        post = client.post
        return {
            "top_k": await post("/v1/score", json={**good, "top_k": 33}, headers=JSON_ACCEPT),
            "top_k_zero": await post("/v1/score", json={**good, "top_k": 0}, headers=JSON_ACCEPT),
            "unknown": await post("/v1/score", json={**good, "student_tokenizer": "nope"}),
            "garbage": await post("/v1/score", content=b"\xc1\xff\x00", headers=MSGPACK),
            "bad_json": await post(
                "/v1/score", content=b"{", headers={"content-type": "application/json"}
            ),
            "media": await post("/v1/score", content=b"x", headers={"content-type": "text/plain"}),
            "empty": await post("/v1/score", content=b"", headers=MSGPACK),
            "list": await post("/v1/score", json=[1, 2]),
            "no_sequences": await post("/v1/score", json={**good, "sequences": []}),
            "out_of_vocab": await post(
                "/v1/score",
                json={
                    **good,
                    "sequences": [{"prompt": {"text": "a"}, "completion_ids": [5, 32000]}],
                },
            ),
            "negative": await post(
                "/v1/score",
                json={**good, "sequences": [{"prompt": {"text": "a"}, "completion_ids": [-1]}]},
            ),
            "two_prompts": await post(
                "/v1/score",
                json={
                    **good,
                    "sequences": [{"prompt": {"text": "a", "ids": [1]}, "completion_ids": [5]}],
                },
            ),
            "long": await post(
                "/v1/score",
                json={
                    **good,
                    "sequences": [{"prompt": {"text": "a"}, "completion_ids": [1000] * 1100}],
                },
            ),
            "route": await client.get("/v1/nothing-here"),
        }

    got = app.run(go)
    expected = {
        "top_k": (422, "top_k 33 is above the maximum 32 of teacher 'default'"),
        "top_k_zero": (422, "top_k"),
        "unknown": (404, "no student tokenizer 'nope'"),
        "garbage": (400, "not valid msgpack"),
        "bad_json": (400, "not valid JSON"),
        "media": (415, "text/plain"),
        "empty": (400, "no body"),
        "list": (422, "map/object"),
        "no_sequences": (422, "sequences"),
        "out_of_vocab": (422, "[0, 32000)"),
        "negative": (422, "greater than or equal to 0"),
        "two_prompts": (422, "exactly one"),
        "long": (413, "max_model_len is 1024"),
        "route": (404, "Not Found"),
    }
    for name, (status, needle) in expected.items():
        response = got[name]
        assert response.status_code == status, (name, response.status_code, response.content[:300])
        assert needle in _error(response), (name, _error(response))


def test_typed_array_that_lies_about_its_size_is_400(app, students):
    body = pack(
        {
            "student_tokenizer": students["gpt2"],
            "top_k": 2,
            "sequences": [
                {
                    "prompt": {"text": "a"},
                    "completion_ids": {"dtype": "<i4", "shape": [3], "data": b"\x01\x00"},
                }
            ],
        }
    )

    async def go(client):
        return await client.post("/v1/score", content=body, headers=MSGPACK)

    response = app.run(go)
    assert response.status_code == 400 and "needs 12 bytes" in _error(response)


def test_typed_array_completion_ids_are_accepted(app, students, bank):
    ids = np.asarray(completion(bank, "mistral-v1"), dtype=np.int32)
    body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 2,
        "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
    }
    _, (seq,) = scored(score(app, body))
    assert len(seq.logprobs_S) == len(ids)


def test_generate_samples_from_the_teacher(app, bank):
    async def go(client):
        body = {"prompts": [{"text": PROMPT}, {"text": "Once"}], "max_tokens": 6, "seed": 3}
        first = await client.post("/v1/generate", json=body, headers=JSON_ACCEPT)
        second = await client.post("/v1/generate", json=body, headers=JSON_ACCEPT)
        too_many = await client.post("/v1/generate", json={**body, "max_tokens": 5000})
        ids_prompt = await client.post("/v1/generate", json={**body, "prompts": [{"ids": [1]}]})
        return first, second, too_many, ids_prompt

    first, second, too_many, ids_prompt = app.run(go)
    assert first.status_code == 200
    completions = first.json()["completions"]
    assert len(completions) == 2
    for item in completions:
        assert 1 <= len(item["ids"]) <= 6 and all(0 <= i < 50257 for i in item["ids"])
        # The text leaves out the end-of-sequence token that stopped it (finish_reason says so).
        stopped = item["finish_reason"] == "stop"
        assert stopped == (item["ids"][-1] == 50256)
        spoken = item["ids"][:-1] if stopped else item["ids"]
        assert item["text"] == bank.tokenizer("gpt2").decode(spoken)
    assert first.json()["completions"] == second.json()["completions"]  # same seed, same samples
    assert first.json()["usage"]["teacher_completion_tokens"] == sum(
        len(c["ids"]) for c in completions
    )
    assert too_many.status_code == 422 and "max_generate_tokens" in _error(too_many)
    assert ids_prompt.status_code == 422


# -- limits, admission, deadlines, cancellation ---------------------------------------------------


def test_body_and_token_limits_name_the_limit(teacher_dir, tmp_path, bank):
    config = config_for(
        teacher_dir, tmp_path, max_body_bytes=2000, max_request_tokens=30, max_tokens_in_flight=30
    )
    ids = completion(bank, "gpt2")
    with running_app(config) as harness:

        async def go(client):
            student = (
                await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
            ).json()["id"]
            big = {
                "student_tokenizer": student,
                "top_k": 2,
                "sequences": [{"prompt": {"text": "a"}, "completion_ids": [10] * 1000}],
            }
            many = {
                "student_tokenizer": student,
                "top_k": 2,
                "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}] * 2,
            }
            return (
                await client.post("/v1/score", json=big),
                await client.post("/v1/score", json=many),
            )

        big, many = harness.run(go)
    assert big.status_code == 413 and "max_body_bytes is 2000" in _error(big)
    assert many.status_code == 413 and "max_request_tokens is 30" in _error(many)


def test_admission_refuses_with_retry_after_then_admits(teacher_dir, tmp_path, bank):
    engine = GatedEngine(transformers_engine(teacher_dir))
    ids = completion(bank, "gpt2")
    config = config_for(
        teacher_dir, tmp_path, max_tokens_in_flight=40, max_request_tokens=40, admission_wait_s=0
    )
    with running_app(config, engine=engine) as harness:

        async def go(client):
            student = (
                await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
            ).json()["id"]
            body = {
                "student_tokenizer": student,
                "top_k": 2,
                "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
            }
            first = asyncio.create_task(client.post("/v1/score", json=body))
            while engine.entered < 1:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/score", json=body)
            engine.gate.set()
            return refused, await first, await client.post("/v1/score", json=body)

        refused, first, later = harness.run(go)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "max_tokens_in_flight" in _error(refused)
    assert first.status_code == 200 and later.status_code == 200


def test_deadline_and_cancellation_abandon_work(teacher_dir, tmp_path, bank):
    engine = GatedEngine(transformers_engine(teacher_dir))
    ids = completion(bank, "gpt2")
    config = config_for(teacher_dir, tmp_path, request_timeout_s=0.5)
    with running_app(config, engine=engine) as harness:
        service = harness.service

        async def go(client):
            student = (
                await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
            ).json()["id"]
            body = {
                "student_tokenizer": student,
                "top_k": 2,
                "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
            }
            late = await client.post("/v1/score", json=body, headers=JSON_ACCEPT)
            in_flight_after_deadline = service.admission.in_flight
            # A caller that leaves: its task is cancelled while the engine holds it.
            from tokenbridge.shared.protocol import ScoreRequest

            task = asyncio.create_task(service.score(ScoreRequest.model_validate(body)))
            while engine.entered < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            engine.gate.set()
            done = await client.post("/v1/score", json=body)
            return late, in_flight_after_deadline, service.admission.in_flight, done

        late, after_deadline, after_cancel, done = harness.run(go)
    assert late.status_code == 504 and "request_timeout_s" in _error(late)
    assert after_deadline == 0 and after_cancel == 0
    assert done.status_code == 200


def test_engine_death_turns_readiness_503(teacher_dir, tmp_path, bank):
    engine = GatedEngine(transformers_engine(teacher_dir))
    engine.gate.set()
    # Restarts off: the death is final at once (test_engine_recovery.py covers restarts).
    config = config_for(teacher_dir, tmp_path, engine_restarts=0)
    with running_app(config, engine=engine) as harness:

        async def go(client):
            student = (
                await client.post("/v1/tokenizers", json={"name": "g", "hub": "gpt2"})
            ).json()["id"]
            healthy = await client.get("/readyz")
            engine.healthy_flag = False
            body = {
                "student_tokenizer": student,
                "top_k": 2,
                "sequences": [{"prompt": {"text": "a"}, "completion_ids": [10, 11]}],
            }
            return healthy, await client.get("/readyz"), await client.post("/v1/score", json=body)

        healthy, dead, refused = harness.run(go)
    assert healthy.status_code == 200
    assert dead.status_code == 503 and dead.json()["state"] == "failed"
    assert refused.status_code == 503 and "retry-after" in refused.headers


def test_api_keys_guard_every_route_but_liveness(teacher_dir, tmp_path):
    config = config_for(teacher_dir, tmp_path, api_keys=("sekret-1",))
    with running_app(config) as harness:

        async def go(client):
            bearer = {"authorization": "Bearer sekret-1"}
            wrong = {"authorization": "Bearer nope"}
            return {
                "health": await client.get("/healthz"),
                "ready_none": await client.get("/readyz"),
                "info_none": await client.get("/v1/info"),
                "info_wrong": await client.get("/v1/info", headers=wrong),
                "info_ok": await client.get("/v1/info", headers=bearer),
                "metrics_none": await client.get("/metrics"),
                "score_none": await client.post("/v1/score", json={}),
                "tokenizers_ok": await client.get("/v1/tokenizers", headers=bearer),
            }

        got = harness.run(go)
    assert got["health"].status_code == 200
    for name in ("ready_none", "info_none", "metrics_none", "score_none"):
        assert got[name].status_code == 401, name
        assert got[name].headers["www-authenticate"] == "Bearer"
    assert got["info_wrong"].status_code == 403
    assert got["info_ok"].status_code == 200 and got["tokenizers_ok"].status_code == 200
    assert "sekret" not in repr(harness.service.config.accepted_key_hashes)


def test_registrations_and_tables_survive_a_restart(teacher_dir, tmp_path, bank):
    config = config_for(teacher_dir, tmp_path)
    ids = completion(bank, "mistral-v1")

    def body(student):
        return {
            "student_tokenizer": student,
            "top_k": 3,
            "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
        }

    async def register_and_score(client):
        student = (
            await client.post("/v1/tokenizers", json={"name": "m", "hub": "mistral-v1"})
        ).json()["id"]
        return student, await client.post("/v1/score", content=pack(body(student)), headers=MSGPACK)

    with running_app(config) as first:
        student, before = first.run(register_and_score)
    tables = list((tmp_path / "tables" / "pairs").glob("*.npz"))
    assert len(tables) == 1
    stamp = tables[0].stat().st_mtime_ns

    async def after_restart(client):
        listing = await client.get("/v1/tokenizers", headers=JSON_ACCEPT)
        return listing, await client.post("/v1/score", content=pack(body(student)), headers=MSGPACK)

    with running_app(config) as second:
        listing, after = second.run(after_restart)
    assert [t["id"] for t in listing.json()["tokenizers"]] == [student]
    _, (a,) = scored(before)
    _, (b,) = scored(after)
    np.testing.assert_array_equal(a.logprobs_S, b.logprobs_S)
    assert tables[0].stat().st_mtime_ns == stamp  # read back, not rebuilt


def test_readiness_is_503_until_started(teacher_dir, tmp_path):
    import httpx

    from tokenbridge.service.app import create_app

    app = create_app(config_for(teacher_dir, tmp_path), engine=transformers_engine(teacher_dir))

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://s"
        ) as c:
            body = {
                "student_tokenizer": "any",
                "top_k": 2,
                "sequences": [{"prompt": {"text": "a"}, "completion_ids": [1]}],
            }
            return await c.get("/readyz"), await c.post("/v1/score", json=body)

    ready, scored_early = asyncio.run(go())
    assert ready.status_code == 503 and ready.json()["state"] == "starting"
    assert scored_early.status_code == 503
    assert "starting" in scored_early.json()["error"]["message"]
    assert scored_early.headers["retry-after"]


# -- teacher compute ------------------------------------------------------------------------------


def test_score_and_generate_report_teacher_flops_alike(app, students, bank, teacher_dir):
    """``usage.teacher_flops`` is the info's FLOP model summed over positions 0..L-1 of every
    sequence, for scoring (prompt + completion) and generation (prompt + sample) alike."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_dir)
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size

    async def go(client):
        info = await client.get("/v1/info")
        prompts = [{"text": PROMPT}, {"text": "Once"}]
        generated = await client.post(
            "/v1/generate",
            json={"prompts": prompts, "max_tokens": 5, "seed": 1},
            headers=JSON_ACCEPT,
        )
        return unpack(info.content), generated

    info, generated = app.run(go)
    flops = info["teacher"]["flops"]
    # The tiny GPT-2 teacher: 12 d² per layer (attention 4 d², MLP 8 d²) plus the head.
    assert flops["matmul_params"] == 12 * layers * d * d + vocab * d
    assert flops["attention_coeff"] == 2 * layers * d

    def sequence_flops(length):
        return sum(2 * flops["matmul_params"] + flops["attention_coeff"] * t for t in range(length))

    teacher_tok = bank.tokenizer("gpt2")
    short = "A shorter completion."
    body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 4,
        "sequences": [
            {"prompt": {"text": PROMPT}, "completion_ids": completion(bank, "mistral-v1")},
            {
                "prompt": {"text": "Once"},
                "completion_ids": completion(bank, "mistral-v1", short),
            },
        ],
    }
    score_body, _ = scored(score(app, body))
    usage = score_body["usage"]
    lengths = [
        len(teacher_tok.encode(PROMPT)) + len(completion(bank, "gpt2")),
        len(teacher_tok.encode("Once")) + len(completion(bank, "gpt2", short)),
    ]
    assert usage["teacher_tokens"] == sum(lengths)
    assert usage["teacher_flops"] == sum(sequence_flops(n) for n in lengths)
    assert isinstance(usage["teacher_flops"], int)

    assert generated.status_code == 200, generated.text
    gen_body = generated.json()
    gen_usage = gen_body["usage"]
    gen_lengths = [
        len(teacher_tok.encode(text)) + len(c["ids"])
        for text, c in zip((PROMPT, "Once"), gen_body["completions"], strict=True)
    ]
    assert gen_usage["teacher_tokens"] == sum(gen_lengths)
    assert gen_usage["teacher_tokens"] == (
        gen_usage["teacher_prompt_tokens"] + gen_usage["teacher_completion_tokens"]
    )
    assert gen_usage["teacher_flops"] == sum(sequence_flops(n) for n in gen_lengths)


def test_generate_without_max_tokens_fits_a_small_max_generate_tokens(teacher_dir, tmp_path):
    config = config_for(teacher_dir, tmp_path, max_generate_tokens=8)
    with running_app(config) as harness:
        response = harness.run(
            lambda client: client.post(
                "/v1/generate", json={"prompts": [{"text": "HAMLET.\n"}], "seed": 1}
            )
        )
    assert response.status_code == 200, response.text
    completion = response.json()["completions"][0]
    assert 1 <= len(completion["ids"]) <= 8


# -- the answers hold to their one declared layout (shared/responses.py) ------------------------


def test_every_answer_has_exactly_the_layout_shared_responses_declares(app, students, bank):
    """Each route's real answer (JSON), candidates included, validates against its
    ``shared.responses`` type, whose objects are closed: a key the service sends but the type
    (and so the generated OpenAPI schema) does not declare fails here, as does a missing one."""
    from pydantic import TypeAdapter

    from tokenbridge.shared import responses

    ids = [int(i) for i in completion(bank, "mistral-v1")]
    candidates = [[i, (i + 1) % 1000, -1] for i in ids]
    score_body = {
        "student_tokenizer": students["mistral-v1"],
        "top_k": 4,
        "sequences": [
            {"prompt": {"text": PROMPT}, "completion_ids": ids, "candidate_ids": candidates},
            {"prompt": {"text": PROMPT}, "completion_ids": ids[:3]},
        ],
    }

    async def go(client):
        return {
            responses.Health: await client.get("/healthz"),
            responses.Readiness: await client.get("/readyz"),
            responses.Info: await client.get("/v1/info", headers=JSON_ACCEPT),
            responses.StudentList: await client.get("/v1/tokenizers", headers=JSON_ACCEPT),
            responses.StudentDescription: await client.get(
                f"/v1/tokenizers/{students['gpt2']}", headers=JSON_ACCEPT
            ),
            responses.Registration: await client.post(
                "/v1/tokenizers", json={"name": "gpt2", "hub": "gpt2"}, headers=JSON_ACCEPT
            ),
            responses.ScoreResponse: await client.post(
                "/v1/score", json=score_body, headers=JSON_ACCEPT
            ),
            responses.GenerateResponse: await client.post(
                "/v1/generate",
                json={"prompts": [{"text": PROMPT}], "max_tokens": 4, "seed": 0},
                headers=JSON_ACCEPT,
            ),
            responses.ErrorBody: await client.get("/v1/tokenizers/nope", headers=JSON_ACCEPT),
        }

    answers = app.run(go)
    for kind, response in answers.items():
        assert response.status_code < 500, (kind.__name__, response.text[:300])
        TypeAdapter(kind).validate_python(response.json())
    scored_body = answers[responses.ScoreResponse].json()
    assert "candidate_logprobs" in scored_body["sequences"][0]
    assert "candidate_logprobs" not in scored_body["sequences"][1]
    # The check has teeth: an undeclared key, or a missing one, is refused.
    info = answers[responses.Info].json()
    with pytest.raises(ValueError):
        TypeAdapter(responses.Info).validate_python({**info, "undeclared": 1})
    del info["teachers"]
    with pytest.raises(ValueError):
        TypeAdapter(responses.Info).validate_python(info)
