"""Distillation losses on the teacher signals the service returns (``docs/mapping.md`` §4b, §5
and §6).

Pure torch: no I/O and nothing from the service. Shape suffixes: ``B`` batch, ``T`` completion
positions, ``K`` top-k columns, ``V`` student vocabulary, ``C`` chunks.

Every loss is masked and averaged over valid tokens: the sum over valid positions divided by their
number. With no valid position it is an exact 0 that is still part of the autograd graph (so
``loss.backward()`` works and gives zero gradients), never NaN.

Conventions the trainer must follow:

* ``logprobs_BT`` are the student's *current* log-probs of its sampled tokens and carry the
  gradient; ``old_logprobs_BT`` are the same at sampling time (the behaviour policy). Both at
  temperature 1, like the teacher's.
* Everything from the teacher, the old log-probs and every advantage are treated as constants
  (detached here), so gradient flows into the student's current log-probs only.
* Advantages mean "more of this token": positive where the teacher gives the sampled token more
  probability than the student did. Losses are minimised, so a positive advantage raises the
  token's log-prob.
* Inputs may hold NaN or ±inf where the service scored nothing: teacher log-probs (NaN, or -inf
  for a truncated lower bound of 0), chunk log-prob sums (NaN), padding ids (-1) with -inf
  log-probs. Such positions are dropped, not propagated; ``position_mask`` applies the same
  rules plus the mapped-mass and exactness thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ClipMode",
    "DivergenceKind",
    "LossOutput",
    "candidate_reverse_kl_loss",
    "discounted_sum",
    "group_baseline",
    "position_baseline",
    "position_mask",
    "reverse_kl_advantage_loss",
    "semantic_prior_loss",
    "sparse_divergence_loss",
]

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


def sparse_divergence_loss(
    student_logprobs_BTV: Tensor,
    sampled_ids_BT: Tensor,
    teacher_topk_ids_BTK: Tensor,
    teacher_topk_logprobs_BTK: Tensor,
    teacher_sampled_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
    eps: float = 1e-6,
) -> LossOutput:
    """Forward KL, reverse KL or generalised JSD on the sparse support plus one tail atom
    (``docs/mapping.md`` §6).

    Support per position: ``S = {teacher top-K ids} ∪ {sampled id}``, padding ids (-1) left out
    and every id counted once (the first column holding it wins, so a sampled token already in
    the top-K keeps its top-K probability; otherwise its teacher probability is
    ``exp(teacher_sampled_logprobs)``). Teacher ``p_S = exp(logprobs)``, divided by ``Σ p_S`` when
    that exceeds 1 (float16 rounding, or the sampled token's §3 value added to a §4 row), and
    ``p_tail = max(0, 1 − Σ p_S)``. Student ``q_S = exp(student_logprobs[S])`` (the rows of
    ``student_logprobs_BTV`` must be normalised log-probs at temperature 1) and
    ``q_tail = max(eps, 1 − Σ q_S)``. Over the atoms ``S ∪ {tail}``, with ``0 · log 0 = 0``:

    * ``"forward"``: ``KL(p‖q) = Σ p log(p / q)``;
    * ``"reverse"``: ``KL(q‖p̃) = Σ q log(q / p̃)``, ``p̃ = max(p, eps) / Σ max(p, eps)``: a zero
      teacher atom (a tail of 0, a sampled token with §4 probability 0) would make it infinite,
      so each atom costs at most about ``log(1 / eps)``;
    * ``"jsd"``: ``β KL(p‖m) + (1 − β) KL(q‖m)``, ``m = β p + (1 − β) q``, TRL's / GKD's
      generalised JSD. As there, ``β = 0`` means forward KL and ``β = 1`` reverse KL (the formula
      itself vanishes at both ends); ``JSD_β(p, q) = JSD_{1−β}(q, p)``, symmetric at ``β = 0.5``.

    Merging everything outside ``S`` into one atom gives a lower bound on the divergence between
    the full distributions (the data-processing inequality; the ``eps`` floors and the rescaling
    can move it by about ``eps``). Service rows already list the sampled token (in the last column
    when it is outside the top-K), so ``teacher_sampled_logprobs_BT`` only fills rows that lack
    it. Gradient flows into ``student_logprobs_BTV`` only.
    ``loss = Σ_valid D_j / #valid``; a position is valid when ``mask`` holds and no support atom
    has a NaN teacher log-prob. Metrics: ``valid_tokens``, ``divergence``,
    ``teacher_support_mass`` (``Σ p_S`` before rescaling), ``student_support_mass`` (``Σ q_S``).
    """
    _check_shapes(
        sampled_ids_BT=sampled_ids_BT,
        teacher_sampled_logprobs_BT=teacher_sampled_logprobs_BT,
        mask_BT=mask_BT,
    )
    _check_shapes(
        teacher_topk_ids_BTK=teacher_topk_ids_BTK,
        teacher_topk_logprobs_BTK=teacher_topk_logprobs_BTK,
    )
    _check_rows(
        mask_BT,
        student_logprobs_BTV=student_logprobs_BTV,
        teacher_topk_ids_BTK=teacher_topk_ids_BTK,
    )
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"kind must be 'forward', 'reverse' or 'jsd'; got {kind!r}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {beta}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1); got {eps}")
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse"

    dtype = _compute_dtype(student_logprobs_BTV)
    mask = mask_BT.bool()
    ids_BTS = torch.cat([teacher_topk_ids_BTK.long(), sampled_ids_BT.long()[..., None]], dim=-1)
    ids_BTS = torch.where(mask[..., None] & (ids_BTS >= 0), ids_BTS, -1)
    teacher_lp_BTS = torch.cat(
        [teacher_topk_logprobs_BTK.detach(), teacher_sampled_logprobs_BT.detach()[..., None]],
        dim=-1,
    ).to(dtype)
    col_BTS = (ids_BTS >= 0) & ~_repeats(ids_BTS)
    valid_BT = mask & ~(col_BTS & torch.isnan(teacher_lp_BTS)).any(dim=-1)
    col_BTS = col_BTS & valid_BT[..., None]

    # Teacher atoms (constants). NaN/-inf off the support become probability 0.
    teacher_lp_BTS = torch.where(col_BTS, teacher_lp_BTS.clamp(max=0.0), -math.inf)
    p_BTS = torch.exp(teacher_lp_BTS)
    p_mass_BT = p_BTS.sum(dim=-1)
    scale_BT = p_mass_BT.clamp(min=1.0)
    p_BTS = p_BTS / scale_BT[..., None]
    p_tail_BT = (1.0 - p_BTS.sum(dim=-1)).clamp(min=0.0)
    p_BTA = torch.cat([p_BTS, p_tail_BT[..., None]], dim=-1)
    atom_BTA = torch.cat([col_BTS, valid_BT[..., None]], dim=-1)
    has_p_BTA = atom_BTA & (p_BTA > 0)
    # log p where p > 0, -inf where p = 0, and 0 off the atoms (no NaN in any branch).
    log_p_BTA = torch.where(has_p_BTA, torch.log(torch.where(has_p_BTA, p_BTA, 1.0)), -math.inf)
    log_p_BTA = torch.where(atom_BTA, log_p_BTA, 0.0)

    # Student atoms (carry the gradient). Off the atoms log q = 0 and q = 0, both masked below.
    gathered_BTS = student_logprobs_BTV.gather(-1, ids_BTS.clamp(min=0)).to(dtype)
    log_q_BTS = torch.where(col_BTS, gathered_BTS.clamp(min=_STUDENT_LOG_FLOOR), 0.0)
    q_BTS = torch.where(col_BTS, torch.exp(log_q_BTS), 0.0)
    q_mass_BT = q_BTS.sum(dim=-1)
    log_q_tail_BT = torch.log((1.0 - q_mass_BT).clamp(min=eps))
    log_q_BTA = torch.cat([log_q_BTS, torch.where(valid_BT, log_q_tail_BT, 0.0)[..., None]], -1)
    q_BTA = torch.where(atom_BTA, torch.exp(log_q_BTA), 0.0)

    if kind == "forward":
        div_BT = _kl_terms(p_BTA, log_p_BTA, log_q_BTA, has_p_BTA)
    elif kind == "reverse":
        floored_BTA = torch.where(atom_BTA, p_BTA.clamp(min=eps), 0.0)
        floored_BTA = floored_BTA / floored_BTA.sum(dim=-1, keepdim=True).clamp(min=eps)
        log_floored_BTA = torch.log(torch.where(atom_BTA, floored_BTA, 1.0))
        div_BT = _kl_terms(q_BTA, log_q_BTA, log_floored_BTA, atom_BTA)
    else:
        # log m = logaddexp(log β + log p, log(1−β) + log q): finite on every atom, since q > 0
        # there (q_tail ≥ eps, log q ≥ the floor) and off the atoms both logs are 0.
        log_m_BTA = torch.logaddexp(math.log(beta) + log_p_BTA, math.log1p(-beta) + log_q_BTA)
        kl_pm_BT = _kl_terms(p_BTA, log_p_BTA, log_m_BTA, has_p_BTA)
        kl_qm_BT = _kl_terms(q_BTA, log_q_BTA, log_m_BTA, atom_BTA)
        div_BT = beta * kl_pm_BT + (1.0 - beta) * kl_qm_BT

    loss = _masked_mean(div_BT, valid_BT)
    metrics = _metrics(
        valid_BT,
        divergence=div_BT.detach(),
        teacher_support_mass=p_mass_BT,
        student_support_mass=q_mass_BT.detach(),
    )
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


def candidate_reverse_kl_loss(
    student_logprobs_BTV: Tensor,
    candidate_ids_BTC: Tensor,
    teacher_candidate_logprobs_BTC: Tensor,
    mask_BT: Tensor,
    *,
    teacher_unresolved_BTC: Tensor | None = None,
    sampled_ids_BT: Tensor | None = None,
    teacher_sampled_logprobs_BT: Tensor | None = None,
    old_logprobs_BT: Tensor | None = None,
    eps: float = 1e-6,
    max_advantage: float = 20.0,
) -> LossOutput:
    """Reverse KL over the student's own candidates, scored exactly by the teacher, and a
    sampled estimate of the divergence inside the rest.

    The candidates ``C_j`` are student ids the trainer chose at position ``j`` (its own top-k at
    sampling time); the service returns the teacher's §4b mass of each from the teacher's *full*
    row (``docs/mapping.md`` §4b). Padding ids (-1) and repeats are left out. Over the atoms
    ``C_j ∪ {rest}``, with student ``q_c = exp(student_logprobs[c])`` (normalised rows at
    temperature 1; the gradient flows here), ``q_rest = max(eps, 1 − Σ q_C)``, teacher
    ``p_c = exp(teacher_candidate_logprobs)`` (``-inf`` is a probability of 0) and
    ``p_rest = 1 − Σ p_C``:

    ``D_j = Σ_{a ∈ C_j ∪ {rest}} q_a (log q_a − log p̃_a)``, ``p̃ = max(p, eps) / Σ max(p, eps)``.

    Where the student's top-k holds nearly all its mass, ``D_j`` is the full per-position reverse
    KL ``KL(π_θ(·|prefix) ‖ teacher)`` up to the rest atom (a lower bound on the full divergence
    by the data-processing inequality, tight as ``q_rest → 0``). Its gradient is the exact
    gradient of that quantity: no sampling noise at position ``j``, unlike the sampled-token
    estimator. With ``teacher_unresolved_BTC`` (mass that may belong to a candidate but hangs on
    the next teacher position, §4b), each candidate's teacher probability is taken at the middle
    of its interval ``[p, p + unresolved]``, and ``unresolved_mass`` reports the mean share.

    The rest atom alone is blind to *where* inside the rest the student puts its mass: a broad
    student (prose, where its top-k holds a third of its mass) lowers ``D_j`` by moving mass out
    of its candidates onto tokens the teacher rejects, and its true divergence grows. With
    ``sampled_ids_BT`` (the sampled token ``y_j``) and ``teacher_sampled_logprobs_BT`` (the
    teacher's log-prob of it, §3), the loss adds the rest's own divergence. Exactly,

    ``KL(q ‖ p) = D_j + q_rest · K_j``, ``K_j = KL(q̄ ‖ p̄)`` with ``q̄ = q / q_rest`` and
    ``p̄ = p / p_rest`` over the ids outside ``C_j``,

    and ``y_j ~ q`` falls in the rest with probability ``q_rest``, so
    ``R_j = 1[y_j ∉ C_j] · A_j · ρ_j``, ``A_j = sg(log q̄_y − log p̄_y)`` (clamped to
    ``±max_advantage``) and ``ρ_j = q_y / sg(q_old,y)`` (1 in value; ``old_logprobs_BT`` the
    sampling policy's, else the current one's), is an unbiased estimate of the second term and
    of its gradient (score function: the part of the gradient that moves ``q_rest`` itself is
    already exact in ``D_j``, and ``log(q_rest / p_rest)`` serves as the baseline). Where the
    sampled token is a candidate, or the teacher gave it no finite log-prob, ``R_j = 0``. It is
    one draw per position, so it adds variance: the trainer uses it only with
    ``--rest-divergence`` (docs/trainer.md's acceptance run says what it did).

    ``loss = Σ_valid (D_j + R_j) / #valid``; valid = ``mask`` with at least one finite candidate
    and no NaN among the candidates' teacher log-probs. Metrics: ``valid_tokens``,
    ``divergence`` (``D_j``), ``rest_divergence`` (``R_j``), ``student_candidate_mass``
    (``Σ q_C``), ``teacher_candidate_mass`` (``Σ p_C``), ``unresolved_mass``.
    """
    _check_shapes(
        candidate_ids_BTC=candidate_ids_BTC,
        teacher_candidate_logprobs_BTC=teacher_candidate_logprobs_BTC,
    )
    _check_rows(
        mask_BT, student_logprobs_BTV=student_logprobs_BTV, candidate_ids_BTC=candidate_ids_BTC
    )
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1); got {eps}")
    dtype = _compute_dtype(student_logprobs_BTV)
    ids_BTC = candidate_ids_BTC.long()
    col_BTC = (ids_BTC >= 0) & ~_repeats(ids_BTC)
    teacher_BTC = teacher_candidate_logprobs_BTC.detach().to(dtype)
    valid_BT = mask_BT.bool() & col_BTC.any(dim=-1) & ~(col_BTC & torch.isnan(teacher_BTC)).any(-1)
    col_BTC = col_BTC & valid_BT[..., None]

    with torch.no_grad():
        p_BTC = torch.where(col_BTC, teacher_BTC.clamp(max=0.0).exp(), 0.0)
        unresolved_BTC = torch.zeros_like(p_BTC)
        if teacher_unresolved_BTC is not None:
            _check_shapes(candidate_ids_BTC=candidate_ids_BTC, unresolved=teacher_unresolved_BTC)
            unresolved_BTC = torch.where(
                col_BTC, torch.nan_to_num(teacher_unresolved_BTC.to(dtype), nan=0.0), 0.0
            ).clamp(min=0.0)
            p_BTC = p_BTC + 0.5 * unresolved_BTC
        p_mass_BT = p_BTC.sum(dim=-1)
        p_BTC = p_BTC / p_mass_BT.clamp(min=1.0)[..., None]
        p_rest_BT = (1.0 - p_BTC.sum(dim=-1)).clamp(min=0.0)
        p_BTA = torch.cat([p_BTC, p_rest_BT[..., None]], dim=-1)
        atom_BTA = torch.cat([col_BTC, valid_BT[..., None]], dim=-1)
        floored_BTA = torch.where(atom_BTA, p_BTA.clamp(min=eps), 0.0)
        floored_BTA = floored_BTA / floored_BTA.sum(dim=-1, keepdim=True).clamp(min=eps)
        log_p_BTA = torch.log(torch.where(atom_BTA, floored_BTA, 1.0))

    gathered_BTC = student_logprobs_BTV.gather(-1, ids_BTC.clamp(min=0)).to(dtype)
    log_q_BTC = torch.where(col_BTC, gathered_BTC.clamp(min=_STUDENT_LOG_FLOOR), 0.0)
    q_BTC = torch.where(col_BTC, log_q_BTC.exp(), 0.0)
    q_mass_BT = q_BTC.sum(dim=-1)
    log_q_rest_BT = torch.log((1.0 - q_mass_BT).clamp(min=eps))
    log_q_BTA = torch.cat([log_q_BTC, torch.where(valid_BT, log_q_rest_BT, 0.0)[..., None]], -1)
    q_BTA = torch.where(atom_BTA, log_q_BTA.exp(), 0.0)
    div_BT = _kl_terms(q_BTA, log_q_BTA, log_p_BTA, atom_BTA)

    rest_BT = torch.zeros_like(div_BT)
    if sampled_ids_BT is not None or teacher_sampled_logprobs_BT is not None:
        if sampled_ids_BT is None or teacher_sampled_logprobs_BT is None:
            raise ValueError("sampled_ids_BT and teacher_sampled_logprobs_BT come together")
        _check_rows(mask_BT, sampled_ids_BT=sampled_ids_BT[..., None],
                    teacher_sampled_logprobs_BT=teacher_sampled_logprobs_BT[..., None])  # fmt: skip
        sampled_BT = sampled_ids_BT.long()
        teacher_y_BT = teacher_sampled_logprobs_BT.detach().to(dtype)
        in_rest_BT = (
            valid_BT
            & ~((ids_BTC == sampled_BT[..., None]) & col_BTC).any(dim=-1)
            & torch.isfinite(teacher_y_BT)
        )
        log_q_y_BT = student_logprobs_BTV.gather(-1, sampled_BT.clamp(min=0)[..., None])
        log_q_y_BT = log_q_y_BT[..., 0].to(dtype).clamp(min=_STUDENT_LOG_FLOOR)
        with torch.no_grad():
            advantage_BT = (log_q_y_BT - log_q_rest_BT) - (
                teacher_y_BT.clamp(max=0.0) - log_p_BTA[..., -1]
            )
            advantage_BT = torch.where(
                in_rest_BT, advantage_BT.clamp(-max_advantage, max_advantage), 0.0
            )
            old_BT = log_q_y_BT if old_logprobs_BT is None else old_logprobs_BT.to(dtype)
        ratio_BT = torch.exp(log_q_y_BT - old_BT.detach())
        rest_BT = torch.where(in_rest_BT, advantage_BT * ratio_BT, 0.0)

    loss = _masked_mean(div_BT + rest_BT, valid_BT)
    metrics = _metrics(
        valid_BT,
        divergence=div_BT.detach(),
        rest_divergence=rest_BT.detach(),
        student_candidate_mass=q_mass_BT.detach(),
        teacher_candidate_mass=p_mass_BT,
        unresolved_mass=unresolved_BTC.sum(dim=-1),
    )
    return LossOutput(loss, metrics)


def with_teacher_support(
    candidate_ids_BTC: Tensor,
    teacher_candidate_logprobs_BTC: Tensor,
    teacher_unresolved_BTC: Tensor,
    topk_ids_BTK: Tensor,
    topk_logprobs_BTK: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's candidates followed by the teacher's own listed ids (its §4 row), as
    ``(ids, teacher log-probs, unresolved)`` for ``candidate_reverse_kl_loss``.

    A student's top-k alone can leave most of both distributions in the rest atom (prose): the
    teacher's top-K ids there make the rest small for the teacher too, so the loss sees where the
    teacher's mass is. Where both name an id the loss keeps the first column, the candidate's
    exact §4b mass; the §4 entries are lower bounds (the teacher's top-K only, no unresolved
    share). Rows the service did not score (NaN candidates) stay NaN in the added columns.
    """
    _check_shapes(
        candidate_ids_BTC=candidate_ids_BTC,
        teacher_candidate_logprobs_BTC=teacher_candidate_logprobs_BTC,
        teacher_unresolved_BTC=teacher_unresolved_BTC,
    )
    _check_shapes(topk_ids_BTK=topk_ids_BTK, topk_logprobs_BTK=topk_logprobs_BTK)
    if topk_ids_BTK.shape[:-1] != candidate_ids_BTC.shape[:-1]:
        raise ValueError(
            f"topk rows {tuple(topk_ids_BTK.shape[:-1])} differ from the candidates' "
            f"{tuple(candidate_ids_BTC.shape[:-1])}"
        )
    unscored_BT1 = torch.isnan(teacher_candidate_logprobs_BTC).all(dim=-1, keepdim=True)
    topk_BTK = torch.where(unscored_BT1, torch.nan, topk_logprobs_BTK.to(
        teacher_candidate_logprobs_BTC.dtype))  # fmt: skip
    return (
        torch.cat([candidate_ids_BTC, topk_ids_BTK.to(candidate_ids_BTC.dtype)], dim=-1),
        torch.cat([teacher_candidate_logprobs_BTC, topk_BTK], dim=-1),
        torch.cat([teacher_unresolved_BTC, torch.zeros_like(topk_BTK)], dim=-1),
    )


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
