"""The teacher's forward FLOPs per token, from its model config (Kaplan et al. 2020, §2.1): what
the service charges each request in ``usage.teacher_flops``, for scoring and generation alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenbridge.shared.responses import FlopCoefficients

__all__ = ["FlopModel", "flop_model"]


@dataclass(frozen=True)
class FlopModel:
    """Forward-pass FLOPs of a decoder-only transformer, per token (Kaplan et al. 2020, §2.1).

    Processing the token at 0-based position ``t`` (``t`` tokens before it in the context) costs
    ``2 * matmul_params + attention_coeff * t`` FLOPs: one multiply-add per weight of every
    matrix the token goes through (the attention projections and the MLP of every layer, and
    the output head; embedding lookups are free), plus attending over the ``t`` earlier tokens
    (``attention_coeff = 2 * layers * heads * head_dim``). Norms, biases, activations and the
    softmax are left out, as in Kaplan et al.

    The count depends only on which positions a token sits at, not on how the engine gets
    there: a prefill of ``L`` tokens (scoring) and a decode that ends with ``L`` tokens in
    context (prompt plus generated) cost the same, ``flops(0, L)``. That is the point: scoring
    and generation are accounted identically, so their costs can be compared and added.
    """

    matmul_params: int
    attention_coeff: int

    def flops(self, positions_start: int, positions_end: int) -> int:
        """FLOPs of processing the tokens at positions ``positions_start .. positions_end - 1``.

        Exact integer arithmetic (the counts pass 2**31 quickly); an empty range costs 0.
        """
        start, end = int(positions_start), int(positions_end)
        if start < 0:
            raise ValueError(f"positions start at 0; got {start}")
        if end <= start:
            return 0
        # sum(t for t in range(start, end)), in closed form.
        earlier = (end * (end - 1) - start * (start - 1)) // 2
        return (end - start) * 2 * self.matmul_params + self.attention_coeff * earlier

    def sequence_flops(self, length: int) -> int:
        """FLOPs of processing a whole sequence of ``length`` tokens (positions 0 .. length-1)."""
        return self.flops(0, length)

    def as_dict(self) -> FlopCoefficients:
        """The two coefficients, as ``/v1/info`` reports them."""
        return {"matmul_params": self.matmul_params, "attention_coeff": self.attention_coeff}


#: Model types whose MLP is two matrices (up, down) although they use Llama-style config names;
#: anything else with an ``intermediate_size`` is taken as gated (gate, up, down: SwiGLU/GeGLU).
_UNGATED_MODEL_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "opt", "bloom",
        "falcon", "phi", "starcoder2", "mpt", "biogpt", "xglm",
    }
)  # fmt: skip


def _config_int(config: Any, *names: str) -> int | None:
    """The first of ``names`` that ``config`` sets to a positive integer, else ``None``."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return None


def flop_model(config: Any) -> FlopModel | None:
    """The ``FlopModel`` of a transformers config (``AutoConfig``), an estimate from its shape.

    Matrices per layer: attention ``q`` and ``o`` (``hidden x heads*head_dim``) and ``k``, ``v``
    (``hidden x kv_heads*head_dim``, so grouped-query attention counts right); the MLP with
    three matrices (gated: Llama, Mistral, Qwen, Gemma) or two (GPT-2 and the types in
    ``_UNGATED_MODEL_TYPES``), of width ``intermediate_size`` (``n_inner``, else 4*hidden).
    Mixture-of-experts configs count the experts a token is routed to, plus a shared expert
    when the config names one; the router is left out. The output head adds ``vocab*hidden``
    whether or not it is tied to the embeddings (tying shares weights, not work).

    Unknown config types get the same estimate from whichever fields exist (multi-head
    attention and a 4*hidden MLP where they are not named). ``None`` when the config names no
    hidden size or no layer count: there is nothing to estimate from. Never raises.
    """
    try:
        return _flop_model(config)
    except Exception:
        # An odd config must not keep a teacher from serving: FLOPs are a report, not a need.
        return None


def _flop_model(config: Any) -> FlopModel | None:
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        # Multimodal configs (Gemma 3, Llava, ...) keep the language model's shape in a sub-config.
        config = getter() or config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        return None
    vocab = _config_int(config, "vocab_size") or 0
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    head_dim = _config_int(config, "head_dim")
    if heads is None:
        heads, head_dim = 1, hidden
    elif head_dim is None:
        head_dim = hidden // heads
    kv_heads = _config_int(config, "num_key_value_heads", "n_head_kv") or heads
    d_attn = heads * head_dim
    attention = 2 * hidden * d_attn + 2 * hidden * kv_heads * head_dim

    model_type = str(getattr(config, "model_type", "") or "")
    gated = model_type not in _UNGATED_MODEL_TYPES and hasattr(config, "intermediate_size")
    matrices = 3 if gated else 2
    experts = _config_int(config, "num_experts_per_tok")
    # Some dense configs carry ``num_experts_per_tok`` too; only a config with experts is MoE.
    if experts is not None and _config_int(
        config, "num_experts", "num_local_experts", "n_routed_experts"
    ):
        width = _config_int(config, "moe_intermediate_size", "intermediate_size") or 4 * hidden
        shared = _config_int(config, "shared_expert_intermediate_size") or 0
        mlp = matrices * hidden * (experts * width + shared)
    else:
        width = _config_int(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
        mlp = matrices * hidden * width
    return FlopModel(
        matmul_params=layers * (attention + mlp) + vocab * hidden,
        attention_coeff=2 * layers * d_attn,
    )
