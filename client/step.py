"""One step's loss: the configured distillation loss of a scored rollout (or SFT's likelihood of
teacher-written completions), built from the teacher's padded signals."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import torch

from tokenbridge.client import losses
from tokenbridge.client.config import TrainConfig
from tokenbridge.client.errors import TeacherProtocolError
from tokenbridge.client.parallel import forward_precision, gradient_sync
from tokenbridge.client.rollout import (
    Prompt,
    Rollout,
    completion_logprobs,
    render_student_prompt,
)
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.errors import AlignmentError
from tokenbridge.shared.protocol import ScoredSequence
from tokenbridge.shared.vocab import Vocab


def _padded(values: list[np.ndarray], width: int, fill: float, dtype: Any) -> torch.Tensor:
    out = np.full((len(values), width, *values[0].shape[1:]) if values else (0, width), fill)
    for b, row in enumerate(values):
        out[b, : len(row)] = row
    return torch.as_tensor(out, dtype=dtype)


def _sampled_rest(
    rollout: Rollout, width: int, teacher_BT: torch.Tensor, old_BT: torch.Tensor
) -> dict[str, Any]:
    """The sampled tokens, the teacher's and the sampling policy's log-probs of them, for the
    candidate loss's rest term."""
    sampled_BT = _padded(
        [np.asarray(ids, dtype=np.int64) for ids in rollout.completion_ids], width, -1, torch.long
    )
    return {
        "sampled_ids_BT": sampled_BT.to(teacher_BT.device),
        "teacher_sampled_logprobs_BT": teacher_BT,
        "old_logprobs_BT": old_BT,
    }


def batch_loss(
    cfg: TrainConfig, model: Any, rollout: Rollout, scored: list[ScoredSequence]
) -> losses.LossOutput:
    """The configured loss of one scored rollout, with gradients into ``model``."""
    logprobs_BT, valid_BT, logprobs_BTV = completion_logprobs(
        model, rollout.prompt_ids, rollout.completion_ids, full=_full(cfg)
    )
    return _loss(cfg, rollout, scored, logprobs_BT, valid_BT, logprobs_BTV)


def _full(cfg: TrainConfig) -> bool:
    """Whether the loss reads the student's whole distribution, not only its sampled tokens."""
    return cfg.loss in ("forward_kl", "sparse_reverse_kl", "jsd", "candidate_reverse_kl") or (
        cfg.loss == "reverse_kl" and _baseline(cfg) == "position"
    )


def _loss(
    cfg: TrainConfig,
    rollout: Rollout,
    scored: list[ScoredSequence],
    logprobs_BT: torch.Tensor,
    valid_BT: torch.Tensor,
    logprobs_BTV: torch.Tensor | None,
) -> losses.LossOutput:
    """``batch_loss`` given the student's log-probs of the rollout."""
    width = logprobs_BT.shape[1]
    device = logprobs_BT.device
    old_BT = _padded(rollout.old_logprobs, width, 0.0, torch.float32).to(device)
    teacher_BT = _padded([s.logprobs_S for s in scored], width, np.nan, torch.float32).to(device)
    exact_BT = _padded([s.exact_S for s in scored], width, False, torch.bool).to(device)
    mapped_BT = _padded(
        [1.0 - s.tail_mass_S - s.unresolved_mass_S for s in scored], width, np.nan, torch.float32
    ).to(device)
    mask_BT = losses.position_mask(
        valid_BT,
        teacher_logprobs_BT=teacher_BT,
        exact_BT=exact_BT,
        mapped_mass_BT=mapped_BT,
        min_mapped_mass=cfg.min_mapped_mass,
        require_exact=cfg.require_exact,
    )

    def teacher_topk() -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's sparse rows, padded (only the losses that read them pay for this)."""
        ids_BTK = _padded([s.topk_ids_SK for s in scored], width, -1, torch.long)
        lps_BTK = _padded([s.topk_logprobs_SK for s in scored], width, -np.inf, torch.float32)
        return ids_BTK.to(device), lps_BTK.to(device)

    if cfg.loss == "candidate_reverse_kl":
        assert logprobs_BTV is not None
        teacher_rows = [
            s.candidate_logprobs_SC for s in scored if s.candidate_logprobs_SC is not None
        ]
        unresolved_rows = [
            s.candidate_unresolved_SC for s in scored if s.candidate_unresolved_SC is not None
        ]
        if (
            rollout.candidate_ids is None
            or len(teacher_rows) < len(scored)
            or len(unresolved_rows) < len(scored)
        ):
            raise TeacherProtocolError(
                "candidate_reverse_kl needs the teacher's candidate_logprobs: the rollout named "
                "no candidates or the service answered none"
            )
        ids_BTC = _padded(rollout.candidate_ids, width, -1, torch.long).to(device)
        teacher_BTC = _padded(teacher_rows, width, np.nan, torch.float32).to(device)
        unresolved_BTC = _padded(unresolved_rows, width, 0.0, torch.float32).to(device)
        if cfg.teacher_support:
            topk_ids_BTK, topk_BTK = teacher_topk()
            ids_BTC, teacher_BTC, unresolved_BTC = losses.with_teacher_support(
                ids_BTC, teacher_BTC, unresolved_BTC,
                topk_ids_BTK[..., : cfg.teacher_support], topk_BTK[..., : cfg.teacher_support],
            )  # fmt: skip
        return losses.candidate_reverse_kl_loss(
            logprobs_BTV,
            ids_BTC,
            teacher_BTC,
            mask_BT,
            teacher_unresolved_BTC=unresolved_BTC,
            **(_sampled_rest(rollout, width, teacher_BT, old_BT) if cfg.rest_divergence else {}),
        )
    if cfg.loss == "reverse_kl":
        baseline_BT = None
        kind = _baseline(cfg)
        if kind == "position":
            assert logprobs_BTV is not None
            baseline_BT = losses.position_baseline(logprobs_BTV.detach(), *teacher_topk(), mask_BT)
        elif kind == "group":
            valid = mask_BT & torch.isfinite(teacher_BT)
            per_token_BT = torch.where(valid, torch.nan_to_num(teacher_BT) - old_BT, 0.0)
            group_B = torch.arange(len(mask_BT), device=device) // cfg.samples_per_prompt
            baseline_BT = losses.group_baseline(per_token_BT, valid, group_B)
            if cfg.discount > 0:
                # The baseline of a discounted return: the same per-token mean, discounted alike.
                baseline_BT = losses.discounted_sum(
                    torch.where(valid, torch.nan_to_num(baseline_BT), 0.0), cfg.discount
                )
        return losses.reverse_kl_advantage_loss(
            logprobs_BT, old_BT, torch.nan_to_num(teacher_BT), mask_BT,
            discount=cfg.discount, clip="ppo", clip_eps=cfg.clip_eps, baseline_BT=baseline_BT,
        )  # fmt: skip
    if cfg.loss == "semantic_prior":
        chunks = max(1, max(len(s.chunk_logprobs_C) for s in scored))
        # -1: padding belongs to no chunk (a real id there would cancel that chunk).
        chunk_ids_BT = _padded([s.chunk_ids_S for s in scored], width, -1, torch.long).to(device)
        chunk_BC = _padded([s.chunk_logprobs_C for s in scored], chunks, np.nan, torch.float32)
        return losses.semantic_prior_loss(
            logprobs_BT, old_BT, chunk_ids_BT, chunk_BC.to(device), mask_BT, clip_eps=cfg.clip_eps
        )
    assert logprobs_BTV is not None
    kinds: dict[str, Literal["forward", "reverse", "jsd"]] = {
        "forward_kl": "forward", "sparse_reverse_kl": "reverse", "jsd": "jsd",
    }  # fmt: skip
    kind = kinds[cfg.loss]
    sampled_BT = _padded(
        [np.asarray(c, dtype=np.int64) for c in rollout.completion_ids], width, 0, torch.long
    ).to(device)
    topk_ids_BTK, topk_lps_BTK = teacher_topk()
    return losses.sparse_divergence_loss(
        logprobs_BTV, sampled_BT, topk_ids_BTK, topk_lps_BTK,
        torch.nan_to_num(teacher_BT, nan=-np.inf), mask_BT, kind=kind, beta=cfg.jsd_beta,
    )  # fmt: skip


def _baseline(cfg: TrainConfig) -> str:
    """The ``reverse_kl`` baseline in force (``auto`` resolved)."""
    if cfg.baseline != "auto":
        return cfg.baseline
    return "group" if cfg.samples_per_prompt > 1 else "position"


#: Metrics that count (summed over micro-batches); the others are means over the valid positions.
_COUNTS = ("valid_tokens", "valid_chunks", "tokens")


def accumulate_gradients(
    cfg: TrainConfig, trained: Any, rollout: Rollout, scored: list[ScoredSequence] | None
) -> losses.LossOutput:
    """One step's loss of ``rollout`` (``scored`` by the teacher; ``None``: SFT on a teacher
    rollout), its gradient added to ``trained``'s, in ``cfg.grad_accum_steps`` micro-batches.

    Each micro-batch holds whole prompt groups (a prompt's samples share their baseline) and is
    forward and backward before the next, so only one micro-batch's activations are held. Every
    loss is a mean over its valid positions, so a micro-batch's loss is weighted by its share of
    the batch's valid positions (``loss_positions``, counted before the first backward): the
    gradient, the loss and the metrics are the whole batch's. The gradients are reduced over the
    ranks once, in the last micro-batch's backward (``parallel.gradient_sync``).
    """
    group = cfg.samples_per_prompt if cfg.loss != "sft" else 1
    groups = len(rollout.completion_ids) // group
    edges = [group * int(e[0]) for e in np.array_split(np.arange(groups), cfg.grad_accum_steps)
             if len(e)] + [len(rollout.completion_ids)]  # fmt: skip
    parts = [
        (_rows(rollout, lo, hi), None if scored is None else scored[lo:hi])
        for lo, hi in itertools.pairwise(edges)
    ]

    def part_loss(part: Rollout, part_scored: list[ScoredSequence] | None) -> losses.LossOutput:
        with forward_precision(trained, cfg.mixed_precision):
            if part_scored is None:
                return sft_loss(trained, part)
            return batch_loss(cfg, trained, part, part_scored)

    if len(parts) == 1:
        # One micro-batch: the plain step, with no stand-in forward to count positions.
        output = part_loss(rollout, scored)
        output.loss.backward()
        return output
    counts = [loss_positions(cfg, part, part_scored) for part, part_scored in parts]
    total = sum(counts)
    loss = torch.zeros(())
    metrics: dict[str, float] = {}
    for index, ((part, part_scored), count) in enumerate(zip(parts, counts, strict=True)):
        weight = count / total if total else 1.0 / len(parts)
        with gradient_sync(trained, sync=index == len(parts) - 1):
            output = part_loss(part, part_scored)
            (output.loss * weight).backward()
        counted = output.metrics.get("valid_tokens", output.metrics.get("tokens"))
        if counted != count:
            raise RuntimeError(
                f"the {cfg.loss} loss averaged over {counted} positions where {count} were "
                "counted without the student: its valid positions depend on the student's "
                "log-probs, so micro-batches cannot be weighted exactly"
            )
        loss = loss + output.loss.detach().cpu() * weight
        for key, value in output.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + (value if key in _COUNTS else value * weight)
    return losses.LossOutput(loss=loss, metrics=metrics)


def loss_positions(cfg: TrainConfig, rollout: Rollout, scored: list[ScoredSequence] | None) -> int:
    """How many positions the loss of ``rollout`` averages over (its ``valid_tokens``; SFT's
    ``tokens``), without the student. Which positions count depends on the rollout and the
    teacher's answers, never on the student's log-probs, so the loss of stand-in log-probs
    (zeros) counts them."""
    if scored is None:
        return sum(len(c) for c in rollout.completion_ids)
    rows = len(rollout.completion_ids)
    width = max(1, max(len(c) for c in rollout.completion_ids))
    valid_BT = torch.zeros((rows, width), dtype=torch.bool)
    for b, completion in enumerate(rollout.completion_ids):
        valid_BT[b, : len(completion)] = True
    logprobs_BTV = None
    if _full(cfg):
        # Only ids the loss gathers index the vocabulary: the stand-in needs no more columns.
        ids = [np.asarray(c, dtype=np.int64) for c in rollout.completion_ids]
        ids += [s.topk_ids_SK for s in scored] + list(rollout.candidate_ids or [])
        vocab = 1 + max([0] + [int(a.max()) for a in ids if a.size])
        logprobs_BTV = torch.zeros(()).expand(rows, width, vocab)
    with torch.no_grad():
        output = _loss(cfg, rollout, scored, torch.zeros((rows, width)), valid_BT, logprobs_BTV)
    return int(output.metrics["valid_tokens"])


def _rows(rollout: Rollout, lo: int, hi: int) -> Rollout:
    """Rows ``lo:hi`` of ``rollout``."""
    candidates = rollout.candidate_ids
    return Rollout(
        rollout.prompts[lo:hi], rollout.prompt_ids[lo:hi], rollout.completion_ids[lo:hi],
        rollout.old_logprobs[lo:hi], None if candidates is None else candidates[lo:hi],
    )  # fmt: skip


def sft_loss(model: Any, rollout: Rollout) -> losses.LossOutput:
    """Negative log-likelihood of teacher-written completions (the SFT baseline)."""
    logprobs_BT, mask_BT, _ = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids)
    count = mask_BT.sum().clamp(min=1)
    loss = -(logprobs_BT * mask_BT).sum() / count
    return losses.LossOutput(
        loss=loss, metrics={"nll": float(loss.detach()), "tokens": float(count)}
    )


def teacher_rollout(tokenizer: Any, vocab: Vocab, prompts: list[Prompt], answer: Any) -> Rollout:
    """The teacher's completions in the student's tokens, each spelling exactly the teacher's
    text after the prompt (a plain ``encode`` would add SentencePiece's dummy space, which the
    student would then learn to write), closed by end-of-sequence when the teacher stopped."""
    prompt_ids = [render_student_prompt(tokenizer, p) for p in prompts]
    completions = []
    for item in answer.completions:
        try:
            ids = encode_continuation(tokenizer, vocab, item.text)
        except AlignmentError:  # text this tokenizer cannot spell byte for byte: its best try
            ids = tokenizer.encode(item.text, add_special_tokens=False)
        if item.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        completions.append(ids or [tokenizer.eos_token_id])
    return Rollout(list(prompts), prompt_ids, completions, [np.zeros(len(c)) for c in completions])
