"""Rollout: the student samples completions of a batch of prompts and records their log-probs.

Prompts stay in the student's own form: text is tokenised by the student, messages go through the
student's chat template. The teacher gets the same prompt as text or messages (``wire_prompt``) and
renders it its own way on the service. The sampling log-probs (``old_logprobs``, temperature 1,
the policy that sampled) are recomputed with one forward pass after generation, so they are
exactly the numbers the loss later compares against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenbridge.client.parallel import is_sharded

__all__ = [
    "Prompt",
    "Rollout",
    "completion_logprobs",
    "cut_after_eos",
    "recorded_rollout",
    "render_student_prompt",
    "sample",
    "wire_prompt",
]

#: A prompt: plain text, or chat messages (``[{"role": ..., "content": ...}]``).
Prompt = str | list[dict[str, str]]


def wire_prompt(prompt: Prompt) -> dict[str, Any]:
    """The prompt as the teacher service takes it (the teacher renders it with its template)."""
    if isinstance(prompt, str):
        return {"text": prompt}
    return {"messages": [dict(m) for m in prompt]}


def render_student_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The student's token ids of ``prompt``: its own special tokens and chat template."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        starter = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        ids = [starter]
    return list(ids)


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled completions, everything the trainer and the teacher need."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_logprobs: list[np.ndarray]
    #: Per completion, the sampling policy's own top-k ids at each position (``T×k``), sent to
    #: the teacher as ``candidate_ids`` (``docs/mapping.md`` §4b); ``None`` when not asked for.
    candidate_ids: list[np.ndarray] | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens sampled."""
        return sum(len(c) for c in self.completion_ids)

    def score_sequences(self) -> list[dict[str, Any]]:
        """The ``sequences`` of a ``/v1/score`` request for this rollout."""
        sequences = [
            {"prompt": wire_prompt(p), "completion_ids": list(c)}
            for p, c in zip(self.prompts, self.completion_ids, strict=True)
        ]
        if self.candidate_ids is not None:
            for sequence, candidates in zip(sequences, self.candidate_ids, strict=True):
                sequence["candidate_ids"] = candidates
        return sequences

    def to_state(self) -> dict[str, Any]:
        """A plain form for checkpoints."""
        return {
            "prompts": self.prompts,
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "old_logprobs": [x.tolist() for x in self.old_logprobs],
            "candidate_ids": (
                None if self.candidate_ids is None else [x.tolist() for x in self.candidate_ids]
            ),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollout:
        """Inverse of ``to_state``."""
        return cls(
            prompts=state["prompts"],
            prompt_ids=state["prompt_ids"],
            completion_ids=state["completion_ids"],
            old_logprobs=[np.asarray(x, dtype=np.float32) for x in state["old_logprobs"]],
            candidate_ids=(
                None
                if state.get("candidate_ids") is None
                else [np.asarray(x, dtype=np.int64) for x in state["candidate_ids"]]
            ),
        )


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids_BL = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        if not seq:
            continue
        if left:
            ids_BL[b, width - len(seq) :] = torch.tensor(seq)
            mask_BL[b, width - len(seq) :] = 1
        else:
            ids_BL[b, : len(seq)] = torch.tensor(seq)
            mask_BL[b, : len(seq)] = 1
    return ids_BL, mask_BL


def completion_logprobs(
    model: Any,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs of each completion token under ``model`` (with gradients when enabled).

    Returns ``logprobs_BT`` (sampled tokens, 0 at padding), ``mask_BT`` (real completion tokens)
    and, when ``full``, ``logprobs_BTV`` over the whole student vocabulary (for sparse losses).
    Row ``t`` is about completion token ``t`` given everything before it.
    """
    device = next(model.parameters()).device
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    ids_BL, mask_BL = _pad(sequences, 0, left=False)
    width_T = max(1, max(len(c) for c in completion_ids))
    logits_BLV = model(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device)).logits
    batch = len(sequences)
    rows_b, rows_p, cols_t = [], [], []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        for t in range(len(c)):
            rows_b.append(b)
            rows_p.append(len(p) + t - 1)
            cols_t.append(t)
    mask_BT = torch.zeros((batch, width_T), dtype=torch.bool, device=device)
    for b, c in enumerate(completion_ids):
        mask_BT[b, : len(c)] = True
    vocab = logits_BLV.shape[-1]
    logprobs_BT = logits_BLV.new_zeros((batch, width_T), dtype=torch.float32)
    logprobs_BTV = None
    if rows_b:
        # Only the rows that predict completion tokens: the prompt's rows are never materialised.
        index_b = torch.tensor(rows_b, device=device)
        index_p = torch.tensor(rows_p, device=device)
        index_t = torch.tensor(cols_t, device=device)
        targets_N = torch.tensor([t for c in completion_ids for t in c], device=device)
        logprobs_NV = torch.log_softmax(logits_BLV[index_b, index_p].float(), dim=-1)
        logprobs_N = logprobs_NV.gather(-1, targets_N[:, None])[:, 0]
        logprobs_BT = logprobs_BT.index_put((index_b, index_t), logprobs_N)
        if full:
            logprobs_BTV = logits_BLV.new_zeros((batch, width_T, vocab), dtype=torch.float32)
            logprobs_BTV = logprobs_BTV.index_put((index_b, index_t), logprobs_NV)
    elif full:
        logprobs_BTV = logits_BLV.new_zeros((batch, width_T, vocab), dtype=torch.float32)
    return logprobs_BT, mask_BT, logprobs_BTV


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    candidates: int = 0,
) -> Rollout:
    """Sample one completion per prompt with transformers ``generate`` and record log-probs
    (and, with ``candidates = k > 0``, the policy's top-k ids at every position).

    A completion ends after the student's end-of-sequence token (kept: the teacher maps it by
    role) or after ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    prompt_ids = [render_student_prompt(tokenizer, p) for p in prompts]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    ids_BL, mask_BL = _pad(prompt_ids, pad_id if pad_id is not None else 0, left=True)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=ids_BL.to(device),
        attention_mask=mask_BL.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        # A sharded student's forwards need every rank: generate until all ranks are done.
        synced_gpus=True if is_sharded(model) else None,
    )
    completions = cut_after_eos(output[:, ids_BL.shape[1] :].tolist(), tokenizer.eos_token_id)
    if was_training:
        model.train()
    return recorded_rollout(model, prompts, prompt_ids, completions, candidates)


def cut_after_eos(rows: list[list[int]], eos_token_id: int | None) -> list[list[int]]:
    """Each sampled row up to and including its first end-of-sequence token (kept: the teacher
    maps it by role), or whole when it has none."""
    if eos_token_id is None:
        return [list(row) for row in rows]
    return [
        row[: row.index(eos_token_id) + 1] if eos_token_id in row else list(row) for row in rows
    ]


@torch.no_grad()
def recorded_rollout(
    model: Any,
    prompts: Sequence[Prompt],
    prompt_ids: list[list[int]],
    completions: list[list[int]],
    candidates: int = 0,
) -> Rollout:
    """The rollout of sampled ``completions`` with their sampling log-probs, recomputed by one
    forward pass of ``model`` in eval mode (whatever sampled them), so that they are exactly what
    the loss later compares against; with ``candidates = k > 0`` also the policy's top-k ids at
    every position (the same pass), for the teacher to score exactly."""
    was_training = model.training
    model.eval()
    try:
        logprobs_BT, _, logprobs_BTV = completion_logprobs(
            model, prompt_ids, completions, full=candidates > 0
        )
    finally:
        if was_training:
            model.train()
    old = [logprobs_BT[b, : len(c)].float().cpu().numpy() for b, c in enumerate(completions)]
    top = None
    if logprobs_BTV is not None:
        top_BTK = torch.topk(logprobs_BTV, k=min(candidates, logprobs_BTV.shape[-1]), dim=-1)
        ids_BTK = top_BTK.indices.cpu().numpy().astype(np.int64)
        top = [ids_BTK[b, : len(c)] for b, c in enumerate(completions)]
    return Rollout(list(prompts), prompt_ids, completions, old, top)
