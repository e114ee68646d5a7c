"""Tiny causal language models over real tokenizers, built locally (no weights to download).

Used by the tests, the benchmarks and the demo as teachers and students. A model folder holds the
weights and the tokenizer (``save_pretrained`` of both), so ``AutoModelForCausalLM`` /
``AutoTokenizer`` and vLLM load it like any checkpoint. Building is deterministic for a seed and is
skipped when the folder already holds a model built with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.hub import load_tokenizer
from tokenbridge.shared.cache import folder_in_place

__all__ = ["TinyModelSpec", "build_tiny_model"]

_SPEC_FILE = "tokenbridge-tiny.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. Head size ``hidden // heads`` must be at least 32 for vLLM's CPU
    attention."""

    tokenizer: str = field(
        default="gpt2", metadata={"help": "offline tokenizer name, tokenizer folder or hub name"}
    )
    architecture: str = field(default="gpt2", metadata={"help": "gpt2 | llama"})
    hidden: int = field(default=64, metadata={"help": "hidden size"})
    layers: int = field(default=2, metadata={"help": "transformer layers"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    max_positions: int = field(default=1024, metadata={"help": "longest sequence"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})

    def __post_init__(self) -> None:
        if self.architecture not in ("gpt2", "llama"):
            raise ValueError(f"architecture must be gpt2 or llama; got {self.architecture!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.layers < 1 or self.max_positions < 8:
            raise ValueError("a model needs at least one layer and eight positions")


def _config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    from transformers import GPT2Config, LlamaConfig

    vocab_size = len(tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_positions=spec.max_positions,
            tie_word_embeddings=True,
            **special,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 4,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        **special,
    )


def build_tiny_model(
    spec: TinyModelSpec, folder: Path | str, cache_dir: Path | str | None = None
) -> Path:
    """Randomly initialise the model ``spec`` describes; save it with its tokenizer to ``folder``.

    Returns ``folder``. The write goes to a temporary folder renamed into place, so a crash never
    leaves half a model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    marker = folder / _SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return folder
    tokenizer = load_tokenizer(spec.tokenizer, cache_dir)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_config(spec, tokenizer))
    with folder_in_place(folder) as workdir:
        model.save_pretrained(str(workdir))
        tokenizer.save_pretrained(str(workdir))
        (workdir / _SPEC_FILE).write_text(json.dumps(asdict(spec), sort_keys=True))
    return folder
