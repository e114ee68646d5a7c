"""What every loss shares: ``LossOutput``, the position mask, discounting, and the checks and
reductions the losses use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

ClipMode = Literal["ppo", "is", "none"]
DivergenceKind = Literal["forward", "reverse", "jsd"]

# A finite stand-in for the student's log 0 (a logit of -inf): keeps a divergence finite where the
# teacher puts mass on a token the student has ruled out, instead of turning the loss into inf.
_STUDENT_LOG_FLOOR = -1e4


@dataclass(frozen=True)
class LossOutput:
    """A scalar ``loss`` to minimise and plain-float ``metrics`` for logging.

    Every loss reports ``valid_tokens`` (how many positions the mean runs over); the others are
    means over those positions and are named in each loss's docstring.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def position_mask(
    scored_mask_BT: Tensor,
    *,
    teacher_logprobs_BT: Tensor | None = None,
    exact_BT: Tensor | None = None,
    mapped_mass_BT: Tensor | None = None,
    min_mapped_mass: float = 0.0,
    require_exact: bool = False,
) -> Tensor:
    """Positions a loss may use (bool, ``B×T``).

    ``mask = scored ∧ isfinite(teacher_logprobs) ∧ (mapped_mass ≥ min_mapped_mass) ∧ (exact if
    require_exact)``; each term applies only when its tensor is given. ``mapped_mass_BT`` is the
    share of the teacher's mass the sparse row accounts for, for example
    ``teacher_topk_logprobs_BTK.exp().sum(-1)`` or ``1 − tail_mass − unresolved_mass``; a NaN
    mapped mass (an unscored row) fails the threshold. A non-finite teacher log-prob is NaN where
    the service scored nothing and -inf where a truncated top-K left a lower bound of 0: neither
    is a usable signal.
    """
    mask_BT = scored_mask_BT.bool()
    if teacher_logprobs_BT is not None:
        _check_shapes(scored_mask_BT=scored_mask_BT, teacher_logprobs_BT=teacher_logprobs_BT)
        mask_BT = mask_BT & torch.isfinite(teacher_logprobs_BT)
    if mapped_mass_BT is not None:
        _check_shapes(scored_mask_BT=scored_mask_BT, mapped_mass_BT=mapped_mass_BT)
        mask_BT = mask_BT & (mapped_mass_BT >= min_mapped_mass)  # NaN compares False
    elif min_mapped_mass > 0.0:
        raise ValueError("min_mapped_mass > 0 needs mapped_mass_BT to compare against")
    if require_exact:
        if exact_BT is None:
            raise ValueError("require_exact=True needs exact_BT")
        _check_shapes(scored_mask_BT=scored_mask_BT, exact_BT=exact_BT)
        mask_BT = mask_BT & exact_BT.bool()
    return mask_BT


# -- helpers ---------------------------------------------------------------------------------------


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 at least: bf16/fp16 lose the small log-prob differences these losses live on."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_shapes(**tensors: Tensor) -> None:
    """Raise when the named tensors do not all have the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


def _check_rows(mask_BT: Tensor, **tensors: Tensor) -> None:
    """Raise unless every named tensor starts with the ``B×T`` of ``mask_BT``."""
    if any(t.shape[:2] != mask_BT.shape for t in tensors.values()):
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(f"{shapes} must start with B×T = {tuple(mask_BT.shape)}")


def _check_clip_eps(clip_eps: float) -> None:
    """PPO's clip range ``[1 − ε, 1 + ε]`` needs ``0 < ε < 1``."""
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(
            f"clip_eps must lie in (0, 1) so that 1 − ε stays positive; got {clip_eps}"
        )


def _masked_mean(values_BT: Tensor, valid_BT: Tensor) -> Tensor:
    """``Σ_valid values / max(#valid, 1)``; an exact, graph-connected 0 when nothing is valid."""
    total = torch.where(valid_BT, values_BT, 0.0).sum()
    return total / valid_BT.sum().clamp(min=1)


def _metrics(valid_BT: Tensor, **values: Tensor) -> dict[str, float]:
    """Masked means of the given tensors plus ``valid_tokens``, read back in one device sync."""
    with torch.no_grad():
        count = valid_BT.sum()
        means = [_masked_mean(v.detach().to(torch.float64), valid_BT) for v in values.values()]
        numbers = torch.stack([count.to(torch.float64), *means]).tolist()
    return dict(zip(["valid_tokens", *values], numbers, strict=True))


def discounted_sum(values_BT: Tensor, discount: float) -> Tensor:
    """``out_j = Σ_{t≥j} γ^{t−j} values_t`` along each row (a reverse scan, T small steps)."""
    out_BT = torch.empty_like(values_BT)
    running_B = values_BT.new_zeros(values_BT.shape[0])
    for t in range(values_BT.shape[1] - 1, -1, -1):
        running_B = values_BT[:, t] + discount * running_B
        out_BT[:, t] = running_B
    return out_BT


def _clipped_surrogate(
    ratio_BT: Tensor, adv_BT: Tensor, clip_eps: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO loss ``−min(rA, clip(r, 1−ε, 1+ε)A)``, for ``A < 0`` with ``dual_clip = c``
    also bounded, ``−max(·, cA)``; plus where the clip and the dual clip are the active terms."""
    clipped_ratio_BT = ratio_BT.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate_BT = torch.minimum(ratio_BT * adv_BT, clipped_ratio_BT * adv_BT)
    clipped_BT = ((adv_BT > 0) & (ratio_BT > 1.0 + clip_eps)) | (
        (adv_BT < 0) & (ratio_BT < 1.0 - clip_eps)
    )
    if dual_clip is None:
        return -surrogate_BT, clipped_BT, torch.zeros_like(clipped_BT)
    # For A < 0 a huge ratio makes rA unboundedly negative; c·A caps how far one token can push.
    dual_BT = (adv_BT < 0) & (ratio_BT > dual_clip)
    bounded_BT = torch.where(
        adv_BT < 0, torch.maximum(surrogate_BT, dual_clip * adv_BT), surrogate_BT
    )
    return -bounded_BT, clipped_BT, dual_BT


def _repeats(ids_BTS: Tensor) -> Tensor:
    """True where a column repeats an id held by an earlier column of the same row."""
    sorted_BTS, order_BTS = torch.sort(ids_BTS, dim=-1, stable=True)
    repeat_sorted_BTS = torch.zeros_like(sorted_BTS, dtype=torch.bool)
    repeat_sorted_BTS[..., 1:] = sorted_BTS[..., 1:] == sorted_BTS[..., :-1]
    # A stable sort keeps equal ids in column order, so the first column holding an id survives.
    return torch.zeros_like(repeat_sorted_BTS).scatter(-1, order_BTS, repeat_sorted_BTS)


def _kl_terms(weight_BTA: Tensor, log_a_BTA: Tensor, log_b_BTA: Tensor, on_BTA: Tensor) -> Tensor:
    """``Σ_{on} w (log a − log b)`` over the atoms; off terms are exactly 0 (``0 · log 0 = 0``)."""
    diff_BTA = torch.where(on_BTA, log_a_BTA - log_b_BTA, 0.0)
    return torch.where(on_BTA, weight_BTA * diff_BTA, 0.0).sum(dim=-1)
