"""``candidate_ids`` through the real app and the real client (§4b): the teacher's mass of named
student ids, from its full row, for an identical and a cross-family pair; JSON and msgpack; the
errors a user meets."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tokenbridge.client.teacher import TeacherClient, TeacherClientConfig
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import MSGPACK, pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import config_for, direct_logprobs, running_app

pytestmark = pytest.mark.integration

TEXT = "To be, or not to be: that is the question 1601."


@pytest.fixture(scope="module")
def app(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("data"), max_top_k=16)
    with running_app(config, loop=loop) as harness:
        yield harness


def _register(app, name: str) -> str:
    async def go(client: httpx.AsyncClient) -> str:
        answer = await client.post("/v1/tokenizers", json={"name": name, "hub": name})
        assert answer.status_code in (200, 201), answer.text
        return answer.json()["id"]

    return app.run(go)


def _post(app, body: dict[str, Any], as_json: bool = False) -> httpx.Response:
    async def go(client: httpx.AsyncClient) -> httpx.Response:
        if as_json:
            return await client.post("/v1/score", json=body)
        return await client.post("/v1/score", content=pack(body), headers={"content-type": MSGPACK})

    return app.run(go)


def test_identical_tokenizers_get_the_teachers_full_row_back(app, bank, teacher_dir):
    student = _register(app, "gpt2")
    tokenizer, vocab = bank.tokenizer("gpt2"), bank.vocab("gpt2")
    ids = encode_continuation(tokenizer, vocab, TEXT)
    rng = np.random.default_rng(0)
    # Ids far outside any top-K: exactly what §4 cannot give and §4b must.
    candidates = rng.integers(0, vocab.size, size=(len(ids), 20))
    candidates[:, 0] = ids
    candidates[:, -1] = -1
    sequence = {"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids,
                "candidate_ids": candidates.tolist()}  # fmt: skip
    answer = _post(app, {"student_tokenizer": student, "top_k": 4, "sequences": [sequence]})
    assert answer.status_code == 200, answer.text
    scored = ScoredSequence.from_wire(unpack(answer.content)["sequences"][0], 4)
    prompt_ids = tokenizer.encode("HAMLET.\n")
    rows = direct_logprobs(teacher_dir, prompt_ids + ids)[len(prompt_ids) - 1 : -1]
    want = np.take_along_axis(rows, np.maximum(candidates, 0), axis=1)
    got = scored.candidate_logprobs_SC
    assert got is not None and got.shape == candidates.shape
    np.testing.assert_allclose(got[:, :-1], want[:, :-1], atol=2e-5)
    assert np.all(got[:, -1] == -np.inf)
    np.testing.assert_allclose(got[:, 0], scored.logprobs_S, atol=2e-5)
    assert scored.candidate_unresolved_SC is not None
    assert np.all(scored.candidate_unresolved_SC[:, :-1] == 0)


def test_cross_family_candidates_agree_with_the_sparse_row_and_json(app, bank):
    student = _register(app, "mistral-v1")
    tokenizer, vocab = bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1")
    ids = encode_continuation(tokenizer, vocab, TEXT)
    body = {"student_tokenizer": student, "top_k": 16, "sequences": [
        {"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids}]}  # fmt: skip
    plain = ScoredSequence.from_wire(unpack(_post(app, body).content)["sequences"][0], 16)
    # Ask for exactly the §4 row's ids: where §4 is exact and its teacher row is the full top
    # of the teacher's distribution, §4b's full-row mass can only be larger or equal.
    candidates = np.where(plain.topk_ids_SK >= 0, plain.topk_ids_SK, -1)
    body["sequences"][0]["candidate_ids"] = candidates.tolist()
    answers = [_post(app, body), _post(app, body, as_json=True)]
    parsed = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        entry = answer.json() if answer.headers["content-type"].startswith("application/json") \
            else unpack(answer.content)  # fmt: skip
        parsed.append(ScoredSequence.from_wire(entry["sequences"][0], 16))
    binary, text = parsed
    assert binary.candidate_logprobs_SC is not None and text.candidate_logprobs_SC is not None
    np.testing.assert_allclose(binary.candidate_logprobs_SC, text.candidate_logprobs_SC, rtol=1e-6)
    # The sampled token is left out: §4 gives it its §3 chain along the actual path where it runs
    # past a teacher token; §4b does not follow the path.
    real = (candidates >= 0) & (candidates != np.asarray(ids)[:, None])
    full = np.exp(binary.candidate_logprobs_SC.astype(np.float64))
    sparse = np.exp(plain.topk_logprobs_SK.astype(np.float64))
    exact_rows = plain.exact_S[:, None] & real & (binary.candidate_unresolved_SC == 0)
    assert exact_rows.sum() > len(ids)  # the comparison covers most of the completion
    assert np.all(full[exact_rows] >= sparse[exact_rows] * (1 - 2e-3) - 1e-6)
    # Per row the candidates never hold more than the teacher's whole mass.
    assert np.all(np.where(candidates >= 0, full, 0).sum(axis=1) <= 1 + 1e-4)


def test_the_client_sends_candidates_and_reads_them_back(app, bank):
    tokenizer, vocab = bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1")
    ids = np.asarray(encode_continuation(tokenizer, vocab, TEXT))
    candidates = np.stack([ids, np.full(len(ids), -1)], axis=1)

    async def go(_: Any) -> Any:
        config = TeacherClientConfig(urls=("http://service",), top_k=8)
        transport = httpx.ASGITransport(app=app.app)
        async with TeacherClient(config, tokenizer, transports=transport) as client:
            assert (await client.info())["teacher"]["candidate_scoring"] is True
            return await client.score(
                [{"prompt": "HAMLET.\n", "completion_ids": ids, "candidate_ids": candidates}]
            )

    result = app.run(go)
    scored = result.sequences[0]
    assert scored.candidate_logprobs_SC is not None
    assert scored.candidate_logprobs_SC.shape == (len(ids), 2)
    assert np.isfinite(scored.candidate_logprobs_SC[:, 0]).mean() > 0.9
    with pytest.raises(ValueError, match="one row per completion token"):
        app.run(_bad_client_call(app, tokenizer, ids, candidates[:-1]))


def _bad_client_call(app, tokenizer, ids, candidates):
    async def go(_: Any) -> Any:
        config = TeacherClientConfig(urls=("http://service",), top_k=8)
        transport = httpx.ASGITransport(app=app.app)
        async with TeacherClient(config, tokenizer, transports=transport) as client:
            return await client.score(
                [{"prompt": "x", "completion_ids": ids, "candidate_ids": candidates}]
            )

    return go


@pytest.mark.parametrize(
    "candidates,status,message",
    [
        ([[1, 2]], 422, "one row per completion token"),
        ([[1, 2], [3, 10**9]], 422, "candidate ids must lie in"),
        ([[1, -2], [3, 4]], 422, "greater than or equal to -1"),
        ([list(range(65)), [1]], 422, "at most 64"),
    ],
)
def test_bad_candidates_are_refused_with_the_reason(app, candidates, status, message):
    student = _register(app, "gpt2")
    sequence = {"prompt": {"text": "A"}, "completion_ids": [32, 33], "candidate_ids": candidates}
    body = {"student_tokenizer": student, "top_k": 4, "sequences": [sequence]}
    answer = _post(app, body, as_json=True)
    assert answer.status_code == status
    assert message in answer.text
