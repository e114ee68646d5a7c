"""Checkpoints for exact resume: the model, optimiser and scheduler, every rank's random state,
data position and the rollouts still in its pipeline, written atomically by rank 0. A sharded
(FSDP) student's full state is gathered first, so the format is the same under every sharding."""

from __future__ import annotations

import os
import random
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenbridge.client.data import PromptStream
from tokenbridge.client.fanout import Pending
from tokenbridge.client.parallel import full_state, is_sharded

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a broken checkpoint


def _gather(value: Any, world: int) -> list[Any]:
    """``value`` of every rank, in rank order (every rank must call this)."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def write_checkpoint(
    path: Path, model: Any, optimiser: Any, scheduler: Any, step: int, stream: PromptStream,
    pipeline: deque[Pending], totals: dict[str, Any], rank: int, world: int, student: str = "",
    lora: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Write the checkpoint (rank 0), with every rank's RNG, data position and pipeline, and the
    student (folder or hub name) whose weights it holds with its LoRA adapters' settings, if any,
    for ``tokenbridge export``."""
    pending = [
        {
            "rollout": p.rollout.to_state(),
            "seed": p.seed,
            "routes": list(p.routes),
            "fielded": list(p.fielded),
        }
        for p in pipeline
    ]
    per_rank = _gather({"rng": rng_state(), "position": stream.position, "pending": pending}, world)
    # Under FSDP every rank gives its shards to rank 0's full state dicts.
    states = full_state(model, optimiser) if rank == 0 or is_sharded(model) else None
    if rank != 0:
        return
    assert states is not None
    model_state, optimiser_state = states
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(
        path,
        {
            "model": model_state,
            "optimiser": optimiser_state,
            "scheduler": scheduler.state_dict(),
            "rng": [r["rng"] for r in per_rank],
            "data_position": [r["position"] for r in per_rank],
            "pending": [r["pending"] for r in per_rank],
            "step": step,
            "totals": dict(totals),
            "student": student,
            "lora": lora,
            "format": 1,
        },
    )
