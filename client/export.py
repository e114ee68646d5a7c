"""Students that leave as Hugging Face models: a folder that
``AutoModelForCausalLM.from_pretrained`` and vLLM load (weights as safetensors, the model config,
the generation config, the tokenizer).

``tokenbridge train`` writes one to ``out_dir/model`` when it finishes (and at every checkpoint
with ``--export-every-checkpoint``); ``tokenbridge export RUN --out DIR`` makes one from any
run's checkpoint. A LoRA run's folder is its adapter; ``--merge`` makes a plain model of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokenbridge.client.checkpoints import CHECKPOINT
from tokenbridge.client.lora import is_lora, merged, with_adapters
from tokenbridge.shared.cache import folder_in_place

__all__ = ["MODEL_DIR", "export_checkpoint", "export_model"]

#: The folder, inside a run's ``out_dir``, that holds its exported model.
MODEL_DIR = "model"


def export_model(model: Any, tokenizer: Any, out: Path | str, merge: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` as a Hugging Face model; returns it.
    A LoRA student is written as its adapter, or with ``merge`` as a plain model with the
    adapters merged into its weights.

    The folder is written beside ``out`` and renamed into place, so a crash never leaves half a
    model behind and a reader never sees one; an existing ``out`` is replaced.
    """
    from transformers import GenerationConfig

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if merge and is_lora(model):
        model = merged(model)
    with folder_in_place(out) as work:
        model.save_pretrained(str(work), safe_serialization=True)
        if not is_lora(model) and not (work / "generation_config.json").exists():
            # vLLM and ``generate`` read their defaults (end-of-text ids) from it.
            GenerationConfig.from_model_config(model.config).save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
    return Path(out)


def export_checkpoint(
    run_dir: Path | str, out: Path | str, student: str = "", merge: bool = False
) -> Path:
    """The Hugging Face folder ``out`` of the checkpoint in ``run_dir`` (``checkpoint.pt``): the
    student it names (or ``student``, a folder or hub name, for checkpoints that name none) with
    the checkpoint's weights; for a LoRA run its adapter, or with ``merge`` the merged model.
    Raises ``FileNotFoundError`` or ``ValueError`` saying what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir}: give the out_dir of a training run")
    state = torch.load(path, map_location="cpu", weights_only=False)
    base = student or state.get("student", "")
    if not base:
        raise ValueError(
            f"{path} does not name its student (written before 2026-12-07): pass --student, the "
            "folder or hub name the run trained"
        )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if state.get("lora"):
        model = with_adapters(model, state["lora"])
    model.load_state_dict(state["model"])
    return export_model(model, tokenizer, out, merge)
