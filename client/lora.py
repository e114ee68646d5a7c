"""LoRA students (peft): low-rank adapters train, the student's own weights stay frozen.

``--lora-r R`` turns it on (0, the default, trains every weight). The checkpoint holds the whole
state (base and adapters) and the adapters' settings, so resume is exact and ``tokenbridge
export`` can rebuild the model; the exported folder holds the adapter (``adapter_config.json``,
``adapter_model.safetensors``, loaded with peft's ``AutoPeftModelForCausalLM``) or, merged, a
plain model that ``from_pretrained`` and vLLM load.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["LoraSettings", "is_lora", "merged", "with_adapters"]

#: What a checkpoint records of the adapters: rank, alpha and the modules they wrap.
LoraSettings = dict[str, Any]


def with_adapters(model: Any, settings: LoraSettings) -> Any:
    """``model`` with fresh LoRA adapters as ``settings`` describe; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(settings["r"]),
        lora_alpha=int(settings["alpha"]),
        target_modules=list(settings["target_modules"]) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        # peft knows default target modules for common architectures only.
        raise ValueError(
            f"LoRA could not wrap the student: {error}; name the modules with "
            "--lora-target-modules (for example q_proj v_proj)"
        ) from None


def is_lora(model: Any) -> bool:
    """Whether ``model`` carries LoRA adapters (a peft model)."""
    return hasattr(model, "peft_config")


def merged(model: Any) -> Any:
    """A copy of the LoRA ``model`` with its adapters merged into the weights: a plain model."""
    return copy.deepcopy(model).merge_and_unload()
