"""The one small protocol every teacher engine implements, and the types it speaks.

An engine owns the teacher model and its tokenizer. It scores token ids (``score``: the teacher's
top-K and the actual token's log-prob at each completion position, temperature 1) and samples
completions (``generate``). Engines are interchangeable behind ``TeacherEngine``; the service
never looks past it.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DEVICES_LOCK",
    "EngineInfo",
    "FlopModel",
    "GenerateParams",
    "Generated",
    "PositionScores",
    "ScoreJob",
    "TeacherEngine",
    "flop_model",
    "package_versions",
]


#: Held while an engine sets ``CUDA_VISIBLE_DEVICES`` for the workers it builds (vLLM with a
#: teacher's ``devices``) and while an engine may initialise CUDA in this process (transformers on
#: a GPU), which reads the variable once: neither may see another teacher's GPUs.
DEVICES_LOCK = threading.Lock()


def package_versions(*packages: str) -> dict[str, str]:
    """The installed version of each package (``absent`` when it is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


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

    def as_dict(self) -> dict[str, int]:
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


@dataclass(frozen=True)
class EngineInfo:
    """What the service reports about its teacher (``/v1/info`` and every response)."""

    backend: str
    model: str
    revision: str | None
    dtype: str
    device: str
    vocab_size: int
    max_top_k: int
    max_model_len: int
    versions: dict[str, str] = field(default_factory=dict)
    #: The teacher's forward FLOPs per token (``flop_model`` of its config); ``None`` when the
    #: config gives nothing to estimate from.
    flop_model: FlopModel | None = None
    #: Whether ``score`` can return full rows (``ScoreJob.full_rows``), which scoring named
    #: student candidates (§4b) needs.
    full_rows: bool = False


@dataclass(frozen=True)
class ScoreJob:
    """Score ``ids[start:]`` given what precedes each of them, with the top ``top_k``.

    ``start`` is at least 1: the first scored token needs a position that predicts it.
    """

    ids: np.ndarray
    start: int
    top_k: int
    #: Also return the teacher's full log-prob row at every scored position (§4b candidates).
    full_rows: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.start <= len(self.ids):
            raise ValueError(f"start must lie in [1, {len(self.ids)}]; got {self.start}")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")

    @property
    def positions(self) -> int:
        """How many tokens get scored."""
        return len(self.ids) - self.start


@dataclass(frozen=True)
class PositionScores:
    """Row ``t`` is about token ``ids[start + t]`` of its ``ScoreJob``.

    ``topk_ids_TK`` / ``topk_logprobs_TK``: the teacher's top-K there, most likely first;
    ``actual_logprobs_T``: the log-prob of the actual token, whatever its rank.
    """

    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    actual_logprobs_T: np.ndarray
    #: The full row over the teacher's vocabulary, when the job asked for it.
    full_logprobs_TV: np.ndarray | None = None


@dataclass(frozen=True)
class GenerateParams:
    """Sampling settings for ``generate``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Generated:
    """One sampled completion: its ids, text and why it stopped (``stop`` or ``length``)."""

    ids: list[int]
    text: str
    finish_reason: str


@runtime_checkable
class TeacherEngine(Protocol):
    """A teacher model that can score token ids and sample completions."""

    info: EngineInfo
    tokenizer: Any

    async def start(self) -> None:
        """Load the model; return when it can serve."""

    async def stop(self) -> None:
        """Finish or abandon outstanding work and release the model."""

    def healthy(self) -> bool:
        """False once the engine can no longer serve (it died or ran out of memory)."""

    async def score(self, job: ScoreJob) -> PositionScores:
        """The teacher's scores of ``job``'s tokens."""

    async def generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        """One completion of ``prompt_ids``."""


def completion_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ``ids`` without the end-of-sequence token that stopped them: the
    stop is reported as ``finish_reason``, and a literal ``<|endoftext|>`` in the text would be
    re-tokenised by a student as ordinary characters."""
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]
    return str(tokenizer.decode(ids))
