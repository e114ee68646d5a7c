"""The trainer sampling the student with vLLM (weights synced every step) against a real
``tokenbridge serve`` process: a cross-family pair, two steps, finite losses, weights moved."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.train import main as train_main

from tests.support.service import serve_process, tiny_teacher

# tests/ is on sys.path, so a bare "vllm" would find this folder: ask for a real vLLM module.
pytest.importorskip("vllm.sampling_params")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytestmark = pytest.mark.vllm


def test_training_with_the_vllm_sampler(tmp_path):
    from transformers import AutoModelForCausalLM

    student = tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)
    args = ["--teacher", str(tiny_teacher("gpt2")), "--data-dir", str(tmp_path / "data")]
    with serve_process(args, tmp_path) as (url, _, _):
        config = TrainConfig(
            student=str(student),
            teacher_urls=(url,),
            sampler="vllm",
            loss="reverse_kl",
            top_k=8,
            steps=2,
            batch_size=2,
            max_new_tokens=12,
            eval_prompts=0,
            out_dir=tmp_path / "run",
            progress=False,
            learning_rate=1e-3,
        )
        summary = train_main(config)
    assert summary.steps == 2 and summary.student_tokens > 0
    records = [json.loads(line) for line in summary.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = torch.load(summary.checkpoint_path, weights_only=False)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    _generates_in_vllm(tmp_path / "run" / "model", student)


def _generates_in_vllm(folder, student):
    """The run's exported model loads in vLLM with the trained weights: vLLM's log-probs of a
    sequence are the exported model's (transformers, float32), not the untrained student's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from tokenbridge.client.vllm_sampler import VLLMSampler

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("12 + 34 = 46. The sea is calm.")["input_ids"]

    def reference(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        rows = torch.log_softmax(logits, dim=-1)[:-1]
        return rows.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]

    with VLLMSampler(str(folder), tokenizer, max_model_len=256, seed=0) as sampler:
        params = SamplingParams(max_tokens=4, prompt_logprobs=0, detokenize=False, temperature=0)
        [output] = sampler.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False
        )
    served = torch.tensor(
        [row[t].logprob for row, t in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
    )
    assert len(output.outputs[0].token_ids) == 4
    trained, untrained = reference(folder), reference(student)
    torch.testing.assert_close(served, trained, rtol=0, atol=1e-3)
    assert (served - untrained).abs().max() > 1e-3
