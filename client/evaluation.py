"""Held-out evaluation during training: the student's reverse KL to its teachers on its own
samples, per token and per byte, with the standard error over the sampled sequences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tokenbridge.client.checkpoints import rng_state, set_rng_state
from tokenbridge.client.fanout import groups_of
from tokenbridge.client.rollout import (
    Prompt,
    sample,
)
from tokenbridge.client.teacher import (
    SyncTeacherClient,
)


def ratio_standard_error(pairs: Sequence[tuple[float, float]]) -> float:
    """Standard error of ``Σ x / Σ y`` over independent samples ``(x_i, y_i)`` (the delta
    method: ``sqrt(Σ (x_i − R y_i)² / (n (n − 1))) / mean(y)``); NaN with fewer than two."""
    if len(pairs) < 2:
        return float("nan")
    xs = np.asarray([x for x, _ in pairs], dtype=np.float64)
    ys = np.asarray([y for _, y in pairs], dtype=np.float64)
    if ys.sum() <= 0:
        return float("nan")
    ratio = xs.sum() / ys.sum()
    n = len(pairs)
    return float(np.sqrt(((xs - ratio * ys) ** 2).sum() / (n * (n - 1))) / ys.mean())


@torch.no_grad()
def evaluate_reverse_kl(
    model: Any,
    tokenizer: Any,
    teacher: SyncTeacherClient | Mapping[str, SyncTeacherClient],
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    seed: int,
    routes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Reverse KL to the teacher per token and per byte on held-out ``prompts``: the student's
    own samples (seeded, temperature 1), scored by the teacher. The caller's random state is
    left as it was, so evaluating never shifts a training run's randomness.

    ``teacher`` may be several clients by name, with ``routes`` naming each prompt's teacher:
    the totals then cover every prompt against its own teacher (``eval_reverse_kl_per_byte_se``:
    the standard error of the per-byte figure over the sampled sequences), and when more than one
    teacher took part each adds ``eval_reverse_kl_per_token@NAME`` and
    ``eval_reverse_kl_per_byte@NAME``.
    """
    clients = dict(teacher) if isinstance(teacher, Mapping) else {"": teacher}
    if routes is None:
        if len(clients) != 1:
            raise ValueError("routes must name each prompt's teacher when several are given")
        routes = [next(iter(clients))] * len(prompts)
    if len(routes) != len(prompts) or not set(routes) <= set(clients):
        raise ValueError(
            f"routes must name one of the teachers {sorted(clients)} for each of the "
            f"{len(prompts)} prompts; got {list(routes)}"
        )
    state = rng_state()
    try:
        rollout = sample(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
            generator_seed=seed + 12345,
        )  # fmt: skip
    finally:
        set_rng_state(state)
    sequences = rollout.score_sequences()
    groups = groups_of(routes)
    # Every teacher's share is in flight at once; each is then read in turn.
    futures = {
        name: clients[name].submit_score([sequences[i] for i in indexes])
        for name, indexes in groups.items()
    }
    out: dict[str, float] = {}
    gap, tokens, total_bytes = 0.0, 0, 0
    per_sequence: list[tuple[float, int]] = []
    for name, indexes in groups.items():
        answer = futures[name].result()
        part_gap, part_tokens, part_bytes = 0.0, 0, 0
        for index, scored in zip(indexes, answer.sequences, strict=True):
            old = rollout.old_logprobs[index]
            finite = np.isfinite(scored.logprobs_S)
            sequence_gap = float((old[finite] - scored.logprobs_S[finite]).sum())
            sequence_bytes = int(scored.alignment.get("total_bytes", 0))
            per_sequence.append((sequence_gap, sequence_bytes))
            part_gap += sequence_gap
            part_tokens += int(finite.sum())
            part_bytes += sequence_bytes
        gap, tokens, total_bytes = gap + part_gap, tokens + part_tokens, total_bytes + part_bytes
        if len(groups) > 1:
            out[f"eval_reverse_kl_per_token@{name}"] = part_gap / max(1, part_tokens)
            out[f"eval_reverse_kl_per_byte@{name}"] = part_gap / max(1, part_bytes)
    return {
        "eval_reverse_kl_per_token": gap / max(1, tokens),
        "eval_reverse_kl_per_byte": gap / max(1, total_bytes),
        "eval_reverse_kl_per_byte_se": ratio_standard_error(per_sequence),
        "eval_student_logprob_per_token": float(
            sum(o.sum() for o in rollout.old_logprobs) / max(1, rollout.tokens)
        ),
        **out,
    }
