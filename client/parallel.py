"""Several ranks under ``torchrun``: DDP or FSDP, mixed precision, and the full state of a sharded
student for checkpoints.

``--sharding ddp`` (the default) gives every rank a whole copy of the student and lets DDP average
the gradients. ``--sharding fsdp`` shards every weight, gradient and optimiser state over the ranks
with PyTorch's ``fully_shard`` (FSDP2): each of the model's blocks (its ``_no_split_modules``, the
decoder layers) is one unit, gathered for its forward and backward and freed after. Every rank
then has to run every forward: generation runs until all ranks are done (``synced_gpus``) and
every rank evaluates. With one rank there is nothing to shard: the student trains as it is.

``--mixed-precision bf16`` computes the forward and backward in bfloat16 and keeps the weights,
the gradient reduction and the optimiser state in float32: FSDP's ``MixedPrecisionPolicy``, else
``torch.autocast`` around the student's forwards.

Checkpoints keep one format whatever the sharding: the full state dicts, gathered to rank 0's CPU
(``torch.distributed.checkpoint.state_dict``), the optimiser's state keyed by position as
``Optimizer.state_dict`` keys it, so a run resumes under either sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "forward_precision",
    "full_state",
    "gradient_sync",
    "is_sharded",
    "load_full_state",
    "plain_number",
    "shard",
]


def shard(model: Any, sharding: str, mixed_precision: str, world: int) -> Any:
    """The module that trains: ``model`` itself (one rank), its DDP wrapper, or ``model`` sharded
    in place by ``fully_shard``. Build the optimiser after this: FSDP replaces the parameters."""
    if world == 1:
        return model
    if sharding == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model`` is sharded by FSDP (every rank must then run each of its forwards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def forward_precision(model: Any, mixed_precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context for the student's forwards: bfloat16 autocast for ``bf16`` unless FSDP's policy
    already computes in it, else nothing."""
    if mixed_precision != "bf16" or is_sharded(model):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def gradient_sync(trained: Any, sync: bool) -> Iterator[None]:
    """Within it, backward passes add to the local gradients without reducing them over the
    ranks (``sync`` false: every micro-batch but a step's last); the last one reduces them all."""
    if sync:
        yield
    elif isinstance(trained, torch.nn.parallel.DistributedDataParallel):
        with trained.no_sync():
            yield
    elif is_sharded(trained):
        trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)
    else:
        yield


def plain_number(value: Any) -> float:
    """A scalar tensor (a ``DTensor`` under FSDP, such as the gradient norm) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def full_state(model: Any, optimiser: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimiser's full state dicts, on the CPU. Under FSDP every rank must
    call this (the shards are gathered); rank 0's are the whole, the others' empty."""
    if not is_sharded(model):
        return model.state_dict(), optimiser.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name: Any = get_optimizer_state_dict(model, optimiser, options=options)
    if not by_name:
        return model_state, {}
    # The helpers key the optimiser's state by parameter name; Optimizer.state_dict by position.
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    position = {name: index for index, name in enumerate(names)}
    return model_state, {
        "state": {position[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_full_state(
    model: Any, optimiser: Any, model_state: dict[str, Any], optimiser_state: dict[str, Any]
) -> None:
    """Load full state dicts (``full_state``'s, on every rank) into ``model`` and ``optimiser``;
    under FSDP each rank keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimiser.load_state_dict(optimiser_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    # The optimiser holds the trainable parameters in the model's order (``train._set_up``).
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    by_name: Any = {
        "state": {names[index]: value for index, value in optimiser_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]}
            for group in optimiser_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimiser, by_name, options=options)
