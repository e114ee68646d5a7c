"""``tokenbridge serve --backend vllm`` as a real process: the engine starts inside uvicorn's
lifespan, scores over loopback, and SIGTERM shuts its worker processes down."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.codec import pack, unpack
from tokenbridge.shared.protocol import ScoredSequence

from tests.support.service import serve_process, tiny_teacher

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")

pytestmark = pytest.mark.vllm


def test_serve_with_the_vllm_backend(tmp_path, bank):
    args = [
        "--teacher",
        str(tiny_teacher("gpt2")),
        "--backend",
        "vllm",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-top-k",
        "20",
        "--data-dir",
        str(tmp_path),
    ]
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with serve_process(args, tmp_path, env=vllm_env, timeout=300) as served:
        url, process, log_path = served
        with httpx.Client(base_url=url, timeout=120) as client:
            info = client.get("/v1/info", headers={"accept": "application/json"}).json()
            assert info["teacher"]["backend"] == "vllm" and info["max_top_k"] == 20
            student = client.post("/v1/tokenizers", json={"name": "m", "hub": "mistral-v1"}).json()
            ids = encode_continuation(
                bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1"), "Alas, poor Yorick! 1601"
            )
            body = {
                "student_tokenizer": student["id"],
                "top_k": 20,
                "sequences": [{"prompt": {"text": "HAMLET.\n"}, "completion_ids": ids}],
            }
            response = client.post(
                "/v1/score", content=pack(body), headers={"content-type": "application/msgpack"}
            )
            assert response.status_code == 200
            decoded = unpack(response.content)
            seq = ScoredSequence.from_wire(decoded["sequences"][0], decoded["top_k"])
            assert seq.topk_ids_SK.shape == (len(ids), 20)
            assert np.isfinite(seq.logprobs_S).all()
            assert seq.chunk_logprobs_C.sum() == pytest.approx(seq.logprobs_S.sum(), abs=1e-3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) in (0, -signal.SIGTERM)
    assert '"message": "stopped"' in log_path.read_text()
