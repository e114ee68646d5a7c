"""Estimators on the sampled tokens: the reverse-KL advantage (PPO-clipped, with a group or
per-position baseline) and the founding paper's chunk-level semantic prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenbridge.client.losses.common import (
    ClipMode,
    LossOutput,
    _check_clip_eps,
    _check_rows,
    _check_shapes,
    _clipped_surrogate,
    _compute_dtype,
    _masked_mean,
    _metrics,
    _repeats,
    discounted_sum,
)


def reverse_kl_advantage_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    discount: float = 0.0,
    clip: ClipMode = "ppo",
    clip_eps: float = 0.2,
    baseline_BT: Tensor | None = None,
) -> LossOutput:
    """Sampled-token reverse KL used as an advantage (``docs/mapping.md`` §6), policy-gradient
    style.

    Per valid token ``A_j = log q(s_j) − log π_old(s_j)`` (teacher minus old student: the negated
    per-token estimate of the reverse KL), then with ``discount = γ > 0`` the discounted sum over
    the rest of the sequence ``A_j ← Σ_{t≥j} γ^{t−j} A_t`` (positions count in ``t − j``; invalid
    ones contribute 0). With ``baseline_BT`` given, ``A_j ← A_j − b_j`` (``group_baseline`` or
    ``position_baseline``: values that do not depend on the token sampled at ``j``, so the
    gradient stays unbiased while its variance drops; a NaN baseline counts as 0). ``A`` is a
    constant. With ``r_j = exp(logprobs_j − old_logprobs_j)``:

    * ``"ppo"``: ``loss_j = −min(r_j A_j, clip(r_j, 1−ε, 1+ε) A_j)``;
    * ``"is"``: ``loss_j = −r_j A_j`` (importance-sampled, unclipped);
    * ``"none"``: ``loss_j = −logprobs_j A_j`` (REINFORCE; on-policy, its gradient equals the
      other two at ``r = 1``).

    ``loss = Σ_valid loss_j / #valid``; valid = ``mask ∧ isfinite(teacher) ∧ isfinite(old)``.
    Metrics: ``valid_tokens``, ``reverse_kl`` (mean ``log π_old − log q``, before discounting),
    ``advantage_mean``, ``ratio_mean``, ``clip_fraction`` (share of valid tokens whose clipped
    term is the active one; 0 unless ``"ppo"``).
    """
    _check_shapes(
        logprobs_BT=logprobs_BT,
        old_logprobs_BT=old_logprobs_BT,
        teacher_logprobs_BT=teacher_logprobs_BT,
        mask_BT=mask_BT,
    )
    if clip not in ("ppo", "is", "none"):
        raise ValueError(f"clip must be 'ppo', 'is' or 'none'; got {clip!r}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must lie in [0, 1]; got {discount}")
    if clip == "ppo":
        _check_clip_eps(clip_eps)
    dtype = _compute_dtype(logprobs_BT)
    logprobs = logprobs_BT.to(dtype)
    old = old_logprobs_BT.detach().to(dtype)
    teacher = teacher_logprobs_BT.detach().to(dtype)
    valid_BT = mask_BT.bool() & torch.isfinite(teacher) & torch.isfinite(old)

    with torch.no_grad():
        per_token_BT = torch.where(valid_BT, teacher - old, 0.0)
        adv_BT = discounted_sum(per_token_BT, discount) if discount > 0.0 else per_token_BT
        if baseline_BT is not None:
            _check_shapes(mask_BT=mask_BT, baseline_BT=baseline_BT)
            baseline = torch.nan_to_num(baseline_BT.detach().to(dtype), nan=0.0)
            adv_BT = torch.where(valid_BT, adv_BT - baseline, 0.0)

    # Invalid positions get a log-ratio of 0 so that no inf/NaN reaches exp() or its gradient.
    log_ratio_BT = torch.where(valid_BT, logprobs - old, 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    clipped_BT = torch.zeros_like(valid_BT)
    if clip == "ppo":
        loss_BT, clipped_BT, _ = _clipped_surrogate(ratio_BT, adv_BT, clip_eps, dual_clip=None)
    elif clip == "is":
        loss_BT = -ratio_BT * adv_BT
    else:
        loss_BT = -torch.where(valid_BT, logprobs, 0.0) * adv_BT

    loss = _masked_mean(loss_BT, valid_BT)
    metrics = _metrics(
        valid_BT,
        reverse_kl=-per_token_BT,
        advantage_mean=adv_BT,
        ratio_mean=ratio_BT.detach(),
        clip_fraction=clipped_BT.to(dtype),
    )
    return LossOutput(loss, metrics)


def semantic_prior_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    chunk_ids_BT: Tensor,
    chunk_teacher_logprobs_BC: Tensor,
    mask_BT: Tensor,
    *,
    clamp: float = 10.0,
    clip_eps: float = 0.2,
    dual_clip: float = 3.0,
) -> LossOutput:
    """The founding paper's chunk-level "semantic prior" target with dual-clip PPO (§5).

    For chunk ``c`` with teacher log-prob sum ``L_T = chunk_teacher_logprobs[c]`` and student
    sum ``L_S = Σ_{i∈c} log p_i`` (``log p_i = old_logprobs_i``, clamped to ≤ 0), each token's
    target is ``log q_i = (L_T / L_S) · log p_i``, computed as ``L_T · (log p_i / L_S)`` so the
    ratio never overflows; when ``L_S = 0`` the chunk's ``L_T`` is split evenly, ``log q_i =
    L_T / n_c`` (as ``bench/seed_style.py`` does). The targets of a chunk sum to ``L_T``. The
    advantage is the constant ``A_i = clamp(log q_i − log p_i, −clamp, clamp)``. With
    ``r_i = exp(logprobs_i − old_logprobs_i)`` and ``s_i = min(r_i A_i, clip(r_i, 1−ε, 1+ε) A_i)``:
    ``loss_i = −s_i`` when ``A_i ≥ 0`` and ``loss_i = −max(s_i, dual_clip · A_i)`` when
    ``A_i < 0``; ``loss = Σ_valid loss_i / #valid``.

    ``chunk_ids_BT`` index the columns of ``chunk_teacher_logprobs_BC``; pad positions outside any
    chunk with -1 (a padded position holding a real chunk id with ``mask`` False voids that
    chunk). A chunk is valid only when every one of its tokens is in ``mask`` with a finite old
    log-prob and its ``L_T`` is finite (the service sends NaN for chunks it could not score);
    tokens of other chunks get no signal. Metrics: ``valid_tokens``, ``valid_chunks``,
    ``reverse_kl`` (mean ``log p_i − log q_i``, i.e. ``Σ (L_S − L_T) / #valid``),
    ``advantage_mean``, ``advantage_clamped_fraction``, ``ratio_mean``, ``clip_fraction``,
    ``dual_clip_fraction``.
    """
    _check_shapes(
        logprobs_BT=logprobs_BT,
        old_logprobs_BT=old_logprobs_BT,
        chunk_ids_BT=chunk_ids_BT,
        mask_BT=mask_BT,
    )
    if chunk_teacher_logprobs_BC.dim() != 2 or chunk_teacher_logprobs_BC.shape[0] != len(mask_BT):
        raise ValueError(
            f"chunk_teacher_logprobs_BC must be B×C with B = {len(mask_BT)}; "
            f"got {tuple(chunk_teacher_logprobs_BC.shape)}"
        )
    if clamp <= 0.0:
        raise ValueError(f"clamp must be positive; got {clamp}")
    _check_clip_eps(clip_eps)
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must exceed 1 (it bounds ratios above 1 + ε); got {dual_clip}")
    B, C = chunk_teacher_logprobs_BC.shape
    chunk_ids = chunk_ids_BT.long()
    if bool((chunk_ids >= C).any()):
        raise ValueError(f"chunk_ids_BT holds ids ≥ C = {C}, the columns of the chunk sums")

    dtype = _compute_dtype(logprobs_BT)
    logprobs = logprobs_BT.to(dtype)
    old = old_logprobs_BT.detach().to(dtype)
    mask = mask_BT.bool()
    in_chunk_BT = chunk_ids >= 0
    ok_BT = mask & torch.isfinite(old)

    with torch.no_grad():
        # One bin per (sequence, chunk), plus a last bin collecting the positions of no chunk.
        offsets_B1 = torch.arange(B, device=chunk_ids.device)[:, None] * C
        bins_BT = torch.where(in_chunk_BT, chunk_ids + offsets_B1, B * C)

        def per_bin(values_BT: Tensor) -> Tensor:
            sums = torch.zeros(B * C + 1, dtype=dtype, device=values_BT.device)
            return sums.index_add_(0, bins_BT.reshape(-1), values_BT.reshape(-1).to(dtype))

        # log p ≤ 0 by definition; a rounding excursion above 0 would flip the chunk's shares.
        log_p_BT = torch.where(ok_BT, old.clamp(max=0.0), 0.0)
        student_sum = per_bin(log_p_BT)
        count = per_bin(torch.ones_like(log_p_BT))
        bad = per_bin((~ok_BT).to(dtype))
        nan = torch.full((1,), math.nan, dtype=dtype, device=old.device)
        teacher_sum = torch.cat([chunk_teacher_logprobs_BC.detach().to(dtype).reshape(-1), nan])
        chunk_ok = (bad == 0) & torch.isfinite(teacher_sum) & (count > 0)
        valid_BT = in_chunk_BT & chunk_ok[bins_BT]

        l_s_BT, l_t_BT, n_BT = student_sum[bins_BT], teacher_sum[bins_BT], count[bins_BT]
        # Every log p in a chunk has the sign of L_S, so log p / L_S is a share in [0, 1].
        share_BT = torch.where(
            l_s_BT < 0, log_p_BT / torch.where(l_s_BT < 0, l_s_BT, -1.0), 1.0 / n_BT.clamp(min=1)
        )
        target_BT = torch.where(valid_BT, l_t_BT * share_BT, 0.0)
        raw_adv_BT = torch.where(valid_BT, target_BT - log_p_BT, 0.0)
        adv_BT = raw_adv_BT.clamp(-clamp, clamp)

    log_ratio_BT = torch.where(valid_BT, logprobs - old, 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    loss_BT, clipped_BT, dual_BT = _clipped_surrogate(ratio_BT, adv_BT, clip_eps, dual_clip)

    loss = _masked_mean(loss_BT, valid_BT)
    metrics = _metrics(
        valid_BT,
        reverse_kl=-raw_adv_BT,
        advantage_mean=adv_BT,
        advantage_clamped_fraction=(raw_adv_BT.abs() > clamp).to(dtype),
        ratio_mean=ratio_BT.detach(),
        clip_fraction=clipped_BT.to(dtype),
        dual_clip_fraction=dual_BT.to(dtype),
    )
    metrics["valid_chunks"] = float(chunk_ok.sum().item())
    return LossOutput(loss, metrics)


def group_baseline(advantage_BT: Tensor, valid_BT: Tensor, group_B: Tensor) -> Tensor:
    """Leave-one-out baseline for several samples of one prompt (``--samples-per-prompt``).

    For sequence ``i`` of group ``g`` (``group_B[i] = g``, any integer label):
    ``b_i = Σ_{i'∈g, i'≠i} Σ_valid A_{i'} / Σ_{i'∈g, i'≠i} #valid_{i'}``, the mean per-token
    advantage of the *other* samples of the same prompt, the same for every position of ``i``.
    It does not depend on sequence ``i``'s own tokens, so subtracting it leaves the gradient
    unbiased and removes the large common part of the advantage (the reverse KL's mean, about
    −1.8 nats per token for a weak student) that otherwise swamps the signal. A sequence alone
    in its group, or whose partners have no valid token, gets NaN (no baseline).
    """
    _check_shapes(advantage_BT=advantage_BT, valid_BT=valid_BT)
    if group_B.shape != advantage_BT.shape[:1]:
        raise ValueError(f"group_B must have shape ({advantage_BT.shape[0]},)")
    with torch.no_grad():
        valid = valid_BT.bool()
        dtype = _compute_dtype(advantage_BT)
        sums_B = torch.where(valid, advantage_BT.to(dtype), 0.0).sum(dim=1)
        counts_B = valid.sum(dim=1).to(dtype)
        _, group_index_B = torch.unique(group_B, return_inverse=True)
        groups = int(group_index_B.max().item()) + 1 if len(group_B) else 0
        group_sums = torch.zeros(groups, dtype=dtype).index_add_(0, group_index_B, sums_B)
        group_counts = torch.zeros(groups, dtype=dtype).index_add_(0, group_index_B, counts_B)
        others_sum_B = group_sums[group_index_B] - sums_B
        others_count_B = group_counts[group_index_B] - counts_B
        baseline_B = torch.where(
            others_count_B > 0, others_sum_B / others_count_B.clamp(min=1), math.nan
        )
        return baseline_B[:, None].expand_as(advantage_BT).clone()


def position_baseline(
    old_logprobs_BTV: Tensor,
    listed_ids_BTK: Tensor,
    listed_teacher_logprobs_BTK: Tensor,
    mask_BT: Tensor,
) -> Tensor:
    """Per-position baseline from the teacher's listed ids: the advantage the sampling policy
    expects at position ``j``, estimated on the listed support.

    With ``L_j`` the listed ids (padding -1 and repeats left out), ``π`` the sampling policy
    (``old_logprobs_BTV``, normalised rows) and ``q`` the teacher's listed log-probs:
    ``b_j = Σ_{v∈L_j} π(v) (log q(v) − log π(v)) / Σ_{v∈L_j} π(v)``, i.e. minus the reverse KL
    restricted to the listed ids and renormalised over the student's mass there. Listed ids
    with teacher probability 0 are left out (their term is −∞). NaN where no listed id has
    student mass or the row is masked. It depends on position ``j``'s prefix, not on the token
    sampled there, so subtracting it keeps the sampled-token gradient unbiased.
    """
    _check_shapes(
        listed_ids_BTK=listed_ids_BTK, listed_teacher_logprobs_BTK=listed_teacher_logprobs_BTK
    )
    _check_rows(mask_BT, old_logprobs_BTV=old_logprobs_BTV, listed_ids_BTK=listed_ids_BTK)
    with torch.no_grad():
        dtype = _compute_dtype(old_logprobs_BTV)
        ids_BTK = listed_ids_BTK.long()
        teacher_BTK = listed_teacher_logprobs_BTK.detach().to(dtype)
        on_BTK = (ids_BTK >= 0) & ~_repeats(ids_BTK) & torch.isfinite(teacher_BTK)
        on_BTK &= mask_BT.bool()[..., None]
        student_BTK = old_logprobs_BTV.detach().to(dtype).gather(-1, ids_BTK.clamp(min=0))
        on_BTK &= torch.isfinite(student_BTK)
        weight_BTK = torch.where(on_BTK, student_BTK.exp(), 0.0)
        gap_BTK = torch.where(on_BTK, teacher_BTK - student_BTK, 0.0)
        mass_BT = weight_BTK.sum(dim=-1)
        value_BT = (weight_BTK * gap_BTK).sum(dim=-1) / mass_BT.clamp(min=1e-30)
        return torch.where(mass_BT > 0, value_BT, math.nan)
