"""Divergences over distributions on the student's own samples: sparse forward/reverse KL and JSD
against the teacher's top-K mapped onto the student's vocabulary, and the reverse KL over the
student's own candidates with the teacher's exact masses (``docs/mapping.md`` §4b)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenbridge.client.losses.common import (
    _STUDENT_LOG_FLOOR,
    DivergenceKind,
    LossOutput,
    _check_rows,
    _check_shapes,
    _compute_dtype,
    _kl_terms,
    _masked_mean,
    _metrics,
    _repeats,
)


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
