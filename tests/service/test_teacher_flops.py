"""The teacher FLOP model (``service/engines/flops.py``: ``FlopModel``, ``flop_model``).

Matmul parameters are checked against the weights of real (tiny, random-init) transformers
models: every ``Linear``/``Conv1D`` weight, the output head included (tied or not), embeddings
and biases left out. Per-position costs follow Kaplan et al.: ``2N + attention_coeff * t``, so a
prefill of ``L`` tokens and a decode to ``L`` tokens cost the same.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.service.engines.base import EngineInfo
from tokenbridge.service.engines.flops import FlopModel, flop_model

VOCAB = 1000


def _configs() -> dict[str, Any]:
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64),
        "gpt2-n_inner": GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_inner=96, n_positions=64
        ),
        # Grouped-query attention and a head size that is not hidden / heads.
        "llama-gqa": LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
        "llama-untied": LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        # Biases on q/k/v: parameters, but not matmul weights.
        "qwen2": Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=64,
        ),
        "qwen3": Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
        ),
        "mistral": MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        # Llama-style names, but a two-matrix MLP.
        "gpt_neox": GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    }


def matmul_weights(config: Any) -> int:
    """Elements of every Linear/Conv1D weight of the model built from ``config``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D)]
    head = model.get_output_embeddings()
    # The head is counted once as a matmul even when its weight is the embedding table.
    assert any(m is head for m in modules)
    return sum(m.weight.numel() for m in modules)


@pytest.mark.parametrize("name", list(_configs()))
def test_matmul_params_equal_the_models_matmul_weights(name):
    config = _configs()[name]
    model = flop_model(config)
    assert model is not None
    assert model.matmul_params == matmul_weights(config)


def test_hand_counts():
    configs = _configs()
    d, L, V = 64, 2, VOCAB
    # GPT-2: c_attn 3d², c_proj d², MLP 2 * d * 4d per layer; Kaplan's 12 L d² plus the head.
    assert flop_model(configs["gpt2"]) == FlopModel(
        matmul_params=12 * L * d * d + V * d, attention_coeff=2 * L * d
    )
    # Llama GQA: q, o at 4*24 = 96 wide, k, v at 2*24 = 48, a gated MLP of three d x 176.
    llama = flop_model(configs["llama-gqa"])
    per_layer = 2 * d * 96 + 2 * d * 48 + 3 * d * 176
    assert llama == FlopModel(matmul_params=L * per_layer + V * d, attention_coeff=2 * L * 96)


def test_unknown_configs_get_an_estimate_or_none_never_an_error():
    bare = SimpleNamespace(hidden_size=64, num_hidden_layers=3, vocab_size=100)
    # Multi-head attention over the whole width and a 4x MLP: Kaplan's 12 L d² plus the head.
    assert flop_model(bare) == FlopModel(
        matmul_params=12 * 3 * 64 * 64 + 100 * 64, attention_coeff=2 * 3 * 64
    )
    no_vocab = flop_model(SimpleNamespace(d_model=32, num_layers=1))
    assert no_vocab == FlopModel(matmul_params=12 * 32 * 32, attention_coeff=2 * 32)
    assert flop_model(SimpleNamespace(vocab_size=100)) is None
    assert flop_model(object()) is None
    assert flop_model(SimpleNamespace(hidden_size="64", num_hidden_layers=None)) is None

    class Broken:
        hidden_size = 64
        num_hidden_layers = 2

        def get_text_config(self):
            raise RuntimeError("broken")

    assert flop_model(Broken()) is None


def test_mixture_of_experts_counts_the_routed_experts():
    moe = SimpleNamespace(
        model_type="qwen2_moe",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
        intermediate_size=512,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=48,
    )
    attention = 4 * 64 * 64
    mlp = 3 * 64 * (2 * 32 + 48)
    assert flop_model(moe) == FlopModel(2 * (attention + mlp) + 100 * 64, 2 * 2 * 64)


def test_multimodal_configs_use_their_text_config():
    text = SimpleNamespace(hidden_size=32, num_hidden_layers=1, vocab_size=10)
    outer = SimpleNamespace(hidden_size=999, num_hidden_layers=9, get_text_config=lambda: text)
    assert flop_model(outer) == flop_model(text)


# -- per-position costs ---------------------------------------------------------------------------

# Coefficients up to a trillion parameters: the sums pass 2**63, so exact ints matter.
models = st.builds(FlopModel, st.integers(0, 10**12), st.integers(0, 10**6))


@settings(max_examples=200, deadline=None)
@given(models, st.integers(0, 300), st.integers(0, 300))
def test_flops_is_the_sum_of_per_position_costs(model, start, length):
    end = start + length
    per_position = sum(
        2 * model.matmul_params + model.attention_coeff * t for t in range(start, end)
    )
    assert model.flops(start, end) == per_position
    assert isinstance(model.flops(start, end), int)
    assert model.flops(end, start) == 0  # a reversed range is empty


@settings(max_examples=100, deadline=None)
@given(models, st.integers(1, 500), st.integers(0, 500))
def test_prefill_of_l_tokens_costs_the_same_as_decoding_to_l(model, prompt, generated):
    total = prompt + generated
    prefill = model.sequence_flops(total)
    # Decode: the prompt in one prefill, then one token at a time with all before it in context.
    decode = model.flops(0, prompt) + sum(model.flops(t, t + 1) for t in range(prompt, total))
    assert prefill == decode
    # Any split into chunks (chunked prefill, speculative steps) costs the same too.
    assert prefill == model.flops(0, prompt) + model.flops(prompt, total)


def test_flops_grow_with_length_and_stay_exact():
    model = flop_model(_configs()["qwen3"])
    assert model is not None
    costs = [model.sequence_flops(n) for n in range(0, 200)]
    assert costs[0] == 0
    assert all(b > a for a, b in itertools.pairwise(costs))
    # Increments grow too: later tokens attend over more context.
    steps = [b - a for a, b in itertools.pairwise(costs)]
    assert all(b > a for a, b in itertools.pairwise(steps))
    big = FlopModel(matmul_params=70 * 10**9, attention_coeff=2 * 80 * 8192)
    # A 70B-class teacher on 4096 tokens: ~5.7e14 FLOPs, far past int32, still exact.
    assert big.sequence_flops(4096) == 4096 * 2 * 70 * 10**9 + 2 * 80 * 8192 * 4096 * 4095 // 2
    with pytest.raises(ValueError, match="positions start at 0"):
        model.flops(-1, 3)


def test_engine_info_carries_the_model():
    model = FlopModel(matmul_params=10, attention_coeff=2)
    info = EngineInfo("transformers", "m", None, "float32", "cpu", 10, 4, 16, flop_model=model)
    assert info.flop_model is model
    assert model.as_dict() == {"matmul_params": 10, "attention_coeff": 2}
    assert EngineInfo("x", "m", None, "f", "cpu", 10, 4, 16).flop_model is None


def test_completion_text_leaves_out_the_stop_token_only():
    from tokenbridge.hub import load_tokenizer
    from tokenbridge.service.engines.base import completion_text

    from tests.support.paths import CACHE_DIR

    tokenizer = load_tokenizer("gpt2", CACHE_DIR)
    ids = tokenizer.encode("so 132.")
    assert completion_text(tokenizer, [*ids, tokenizer.eos_token_id]) == "so 132."
    assert completion_text(tokenizer, ids) == "so 132."
    # An end-of-sequence token inside the text is not a stop: it stays.
    inner = [*ids, tokenizer.eos_token_id, *ids]
    assert completion_text(tokenizer, inner) == tokenizer.decode(inner)
    assert completion_text(tokenizer, []) == ""
