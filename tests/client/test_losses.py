"""The client's distillation losses against deliberately naive loop formulas, plus identities."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.client.losses import (
    LossOutput,
    position_mask,
    reverse_kl_advantage_loss,
    semantic_prior_loss,
    sparse_divergence_loss,
)

B, T, V, K = 2, 5, 7, 3
EPS = 1e-6  # the default floor of sparse_divergence_loss


def tensor(array, dtype=torch.float64, grad=False):
    out = torch.as_tensor(np.asarray(array), dtype=dtype)
    return out.requires_grad_(grad)


def grad_of(leaf: torch.Tensor) -> torch.Tensor:
    assert leaf.grad is not None
    return leaf.grad


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def naive_ppo(r: float, adv: float, eps: float, dual: float | None) -> tuple[float, float]:
    """The (dual-clip) PPO objective of one token and its derivative in the token's log-prob."""
    unclipped, clipped = r * adv, min(max(r, 1 - eps), 1 + eps) * adv
    value, slope = (unclipped, r * adv) if unclipped <= clipped else (clipped, 0.0)
    if dual is not None and adv < 0 and dual * adv > value:
        value, slope = dual * adv, 0.0
    return value, slope


# -- reverse_kl_advantage_loss ---------------------------------------------------------------------


def reverse_kl_case(seed: int):
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
    teacher = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
    # Ratios both inside and well outside the clip range.
    logprobs = old + rng.normal(0.0, 0.4, size=(B, T))
    mask = rng.uniform(size=(B, T)) > 0.2
    mask[0, 0], mask[1, 4] = True, False
    teacher[1, 4] = np.nan  # unscored and masked
    teacher[0, 3] = np.nan  # unscored but left in the mask: must be dropped, not propagated
    return logprobs, old, teacher, mask


def naive_reverse_kl(logprobs, old, teacher, mask, discount, clip, eps=0.2):
    valid = mask & np.isfinite(teacher)
    total, count, grad = 0.0, 0, np.zeros((B, T))
    for b in range(B):
        per_token = [teacher[b, t] - old[b, t] if valid[b, t] else 0.0 for t in range(T)]
        for t in range(T):
            if not valid[b, t]:
                continue
            adv = sum(discount ** (u - t) * per_token[u] for u in range(t, T))
            r = math.exp(logprobs[b, t] - old[b, t])
            if clip == "ppo":
                value, slope = naive_ppo(r, adv, eps, None)
            elif clip == "is":
                value, slope = r * adv, r * adv
            else:
                value, slope = logprobs[b, t] * adv, adv
            total -= value
            grad[b, t] = -slope
            count += 1
    return total / count, grad / count


@pytest.mark.parametrize("clip", ["ppo", "is", "none"])
@pytest.mark.parametrize("discount", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_kl_advantage_loss_matches_the_naive_formula(clip, discount, seed):
    logprobs, old, teacher, mask = reverse_kl_case(seed)
    lp = tensor(logprobs, grad=True)

    out = reverse_kl_advantage_loss(
        lp, tensor(old), tensor(teacher), tensor(mask, torch.bool), discount=discount, clip=clip
    )
    out.loss.backward()

    want_loss, want_grad = naive_reverse_kl(logprobs, old, teacher, mask, discount, clip)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    valid = mask & np.isfinite(teacher)
    assert out.metrics["valid_tokens"] == valid.sum()
    assert out.metrics["reverse_kl"] == pytest.approx((old - teacher)[valid].mean())


def test_reverse_kl_positive_advantage_raises_the_token_logprob():
    old = tensor([[-2.0, -0.5]])
    teacher = tensor([[-0.5, -2.0]])  # the teacher likes token 0 more, token 1 less
    for clip in ("ppo", "is", "none"):
        lp = old.clone().requires_grad_(True)
        out = reverse_kl_advantage_loss(
            lp, old, teacher, tensor([[True, True]], torch.bool), clip=clip
        )
        out.loss.backward()
        assert lp.grad[0, 0] < 0 < lp.grad[0, 1]  # gradient descent: token 0 up, token 1 down
        assert out.metrics["advantage_mean"] == pytest.approx(0.0)


def test_ppo_clip_fraction_counts_ratios_past_the_clip():
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    teacher = torch.full((1, 4), -0.5, dtype=torch.float64)  # A = +0.5 everywhere
    mask = torch.ones(1, 4, dtype=torch.bool)

    far = (old + 2.0).requires_grad_(True)  # r = e² ≫ 1 + ε with A > 0: the clip bites
    out = reverse_kl_advantage_loss(far, old, teacher, mask, clip="ppo")
    out.loss.backward()
    assert out.metrics["clip_fraction"] == 1.0
    assert torch.all(grad_of(far) == 0)

    near = old.clone().requires_grad_(True)
    out = reverse_kl_advantage_loss(near, old, teacher, mask, clip="ppo")
    assert out.metrics["clip_fraction"] == 0.0
    assert out.metrics["ratio_mean"] == pytest.approx(1.0)

    low = (old - 2.0).requires_grad_(True)  # r ≪ 1 − ε with A > 0: unclipped side of the min
    out = reverse_kl_advantage_loss(low, old, teacher, mask, clip="ppo")
    out.loss.backward()
    assert out.metrics["clip_fraction"] == 0.0
    assert torch.all(grad_of(low) < 0)


def test_discounted_advantage_skips_masked_positions_but_counts_their_distance():
    old = torch.zeros(1, 3, dtype=torch.float64)
    teacher = tensor([[-1.0, -100.0, -2.0]])
    mask = tensor([[True, False, True]], torch.bool)
    out = reverse_kl_advantage_loss(old, old, teacher, mask, discount=0.5, clip="is")
    # A_0 = -1 + 0.5² · -2 = -1.5, A_2 = -2; the loss is −mean(r·A) with r = 1.
    assert out.loss.item() == pytest.approx((1.5 + 2.0) / 2)


# -- semantic_prior_loss ---------------------------------------------------------------------------


def semantic_case():
    """Hand-made chunks hitting each rule once (see the comments)."""
    chunk_ids = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, -1, -1]])
    # Row 0: chunk 0 has a tiny L_S and a very negative L_T (clamped advantages); chunk 1 has
    # L_S = 0 (L_T split evenly); chunk 2 is an ordinary chunk. Row 1: chunk 1 holds a masked
    # token (no signal), chunk 2 has no teacher sum (NaN), the last positions are padding (-1).
    old = np.array([[-0.01, -0.02, 0.0, 0.0, -0.7, -0.4], [-0.3, -1.2, -0.8, -0.9, -5.0, -5.0]])
    chunk_lp = np.array([[-60.0, -0.3, -4.0, np.nan], [-0.2, -1.0, np.nan, np.nan]])
    mask = np.array([[True] * 6, [True, True, False, True, False, False]])
    # Ratios: inside the clip, past 1 + ε, below 1 − ε, and past the dual clip with A < 0.
    log_ratio = np.array([[0.05, 0.5, -0.5, 0.1, 1.5, -0.1], [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    return old + log_ratio, old, chunk_ids, chunk_lp, mask


def random_semantic_case(seed: int):
    rng = np.random.default_rng(seed)
    chunk_ids = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        chunk_ids[b] = np.cumsum(np.r_[0, rng.uniform(size=T - 1) < 0.5])
    chunk_ids[1, -2:] = -1  # padding
    C = int(chunk_ids.max()) + 2
    old = np.log(rng.uniform(0.01, 1.0, size=(B, T)))
    chunk_lp = np.log(rng.uniform(0.001, 1.0, size=(B, C)))
    chunk_lp[0, 1] = np.nan
    mask = (rng.uniform(size=(B, T)) > 0.15) & (chunk_ids >= 0)
    logprobs = old + rng.normal(0.0, 0.6, size=(B, T))
    return logprobs, old, chunk_ids, chunk_lp, mask


def naive_semantic(logprobs, old, chunk_ids, chunk_lp, mask, clamp=10.0, eps=0.2, dual=3.0):
    total, count, grad = 0.0, 0, np.zeros(old.shape)
    for b in range(old.shape[0]):
        chunks: dict[int, list[int]] = {}
        for t in range(old.shape[1]):
            if chunk_ids[b, t] >= 0:
                chunks.setdefault(int(chunk_ids[b, t]), []).append(t)
        for c, positions in chunks.items():
            l_t = chunk_lp[b, c]
            if not all(mask[b, t] for t in positions) or not math.isfinite(l_t):
                continue
            log_p = [min(old[b, t], 0.0) for t in positions]
            l_s = sum(log_p)
            for t, lp_i in zip(positions, log_p, strict=True):
                target = (l_t / l_s) * lp_i if l_s != 0 else l_t / len(positions)
                adv = min(max(target - lp_i, -clamp), clamp)
                value, slope = naive_ppo(math.exp(logprobs[b, t] - old[b, t]), adv, eps, dual)
                total -= value
                grad[b, t] = -slope
                count += 1
    return total / count, grad / count, count


@pytest.mark.parametrize("case", ["hand-made", "random-0", "random-1", "random-2"])
def test_semantic_prior_loss_matches_the_naive_formula(case):
    if case == "hand-made":
        logprobs, old, chunk_ids, chunk_lp, mask = semantic_case()
    else:
        logprobs, old, chunk_ids, chunk_lp, mask = random_semantic_case(int(case[-1]))
    lp = tensor(logprobs, grad=True)

    out = semantic_prior_loss(
        lp, tensor(old), tensor(chunk_ids, torch.long), tensor(chunk_lp), tensor(mask, torch.bool)
    )
    out.loss.backward()

    want_loss, want_grad, count = naive_semantic(logprobs, old, chunk_ids, chunk_lp, mask)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    assert out.metrics["valid_tokens"] == count


def test_semantic_prior_hand_made_case_hits_every_rule():
    logprobs, old, chunk_ids, chunk_lp, mask = semantic_case()
    out = semantic_prior_loss(
        tensor(logprobs),
        tensor(old),
        tensor(chunk_ids, torch.long),
        tensor(chunk_lp),
        tensor(mask, torch.bool),
    )
    # Valid: row 0 (chunks 0, 1, 2) and row 1 chunk 0.
    assert out.metrics["valid_tokens"] == 7
    assert out.metrics["valid_chunks"] == 4
    assert out.metrics["advantage_clamped_fraction"] == pytest.approx(2 / 7)
    assert out.metrics["dual_clip_fraction"] > 0
    assert out.metrics["clip_fraction"] > 0
    # The targets of each chunk sum to its L_T, so the mean log p − log q is Σ (L_S − L_T) / n.
    l_s = [-0.03, 0.0, -1.1, -0.3]
    l_t = [-60.0, -0.3, -4.0, -0.2]
    assert out.metrics["reverse_kl"] == pytest.approx((sum(l_s) - sum(l_t)) / 7)


def test_semantic_prior_is_flat_when_teacher_and_student_agree_on_every_chunk():
    old = tensor([[-0.5, -1.5, -0.2, -0.7]])
    chunk_ids = tensor([[0, 0, 1, 1]], torch.long)
    chunk_lp = tensor([[-2.0, -0.9]])  # L_T == L_S
    lp = old.clone().requires_grad_(True)
    out = semantic_prior_loss(lp, old, chunk_ids, chunk_lp, torch.ones(1, 4, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-15)
    assert torch.allclose(lp.grad, torch.zeros_like(lp.grad), atol=1e-15)


def test_semantic_prior_teacher_liking_a_chunk_more_raises_its_tokens():
    old = tensor([[-1.0, -2.0, -1.0]])
    chunk_ids = tensor([[0, 0, 1]], torch.long)
    chunk_lp = tensor([[-0.5, -3.0]])  # chunk 0: teacher more likely; chunk 1: less likely
    lp = old.clone().requires_grad_(True)
    out = semantic_prior_loss(lp, old, chunk_ids, chunk_lp, torch.ones(1, 3, dtype=torch.bool))
    out.loss.backward()
    assert lp.grad[0, 0] < 0 and lp.grad[0, 1] < 0 < lp.grad[0, 2]


def test_semantic_prior_rejects_chunk_ids_past_the_chunk_sums():
    with pytest.raises(ValueError, match="ids ≥ C"):
        semantic_prior_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.tensor([[0, 2]]),
            torch.zeros(1, 2),
            torch.ones(1, 2, dtype=torch.bool),
        )


# -- sparse_divergence_loss ------------------------------------------------------------------------


def sparse_case(seed: int, logit_scale: float = 1.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    student_lp = log_softmax(rng.normal(0.0, logit_scale, size=(B, T, V)))
    teacher_lp = log_softmax(rng.normal(0.0, 2.0 * logit_scale, size=(B, T, V)))
    sampled = rng.integers(0, V, size=(B, T))
    topk_ids = np.stack([[rng.permutation(V)[:K] for _ in range(T)] for _ in range(B)])
    topk_lp = np.take_along_axis(teacher_lp, topk_ids, axis=-1)
    # The §3 value of the sampled token: close to, but not the same as, its §4 value.
    teacher_sampled = np.take_along_axis(teacher_lp, sampled[..., None], -1)[..., 0] - 0.1
    mask = np.ones((B, T), dtype=bool)
    # (0, 0): the sampled token repeats a top-K id; its top-K value must win.
    topk_ids[0, 0, 1] = sampled[0, 0]
    topk_lp[0, 0, 1] = teacher_lp[0, 0, sampled[0, 0]]
    # (0, 1): padding columns, and a top-K id listed twice.
    topk_ids[0, 1, 2], topk_lp[0, 1, 2] = -1, -np.inf
    topk_ids[0, 1, 1], topk_lp[0, 1, 1] = topk_ids[0, 1, 0], topk_lp[0, 1, 0]
    # (0, 2): the sampled token listed with §4 probability 0.
    topk_ids[0, 2, 2], topk_lp[0, 2, 2] = sampled[0, 2], -np.inf
    # (1, 0): a §3 value that pushes the support mass over 1 (rescaled).
    topk_ids[1, 0] = [i for i in range(V) if i != sampled[1, 0]][:K]
    topk_lp[1, 0] = np.log([0.5, 0.3, 0.1])
    teacher_sampled[1, 0] = math.log(0.4)
    # (1, 1): masked, with NaNs and an out-of-range sampled id.
    mask[1, 1] = False
    topk_lp[1, 1] = np.nan
    teacher_sampled[1, 1], sampled[1, 1] = np.nan, V + 3
    # (1, 2): in the mask but unscored (NaN for the sampled token, which is not in the top-K).
    topk_ids[1, 2] = [i for i in range(V) if i != sampled[1, 2]][:K]
    teacher_sampled[1, 2] = np.nan
    # (1, 3): nothing but padding in the top-K.
    topk_ids[1, 3], topk_lp[1, 3] = -1, -np.inf
    return student_lp, sampled, topk_ids, topk_lp, teacher_sampled, mask


def naive_divergence(p: list[float], q: list[float], kind: str, beta: float) -> float:
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        floored = [max(x, EPS) for x in p]
        return kl(q, [x / sum(floored) for x in floored])
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def naive_sparse(case: tuple[np.ndarray, ...], kind: str, beta: float) -> tuple[float, int]:
    student_lp, sampled, topk_ids, topk_lp, teacher_sampled, mask = case
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            support: dict[int, float] = {}
            for k in range(topk_ids.shape[-1]):
                if topk_ids[b, t, k] >= 0:
                    support.setdefault(int(topk_ids[b, t, k]), topk_lp[b, t, k])
            support.setdefault(int(sampled[b, t]), teacher_sampled[b, t])
            if any(math.isnan(v) for v in support.values()):
                continue
            p = [math.exp(v) for v in support.values()]
            p = [x / max(sum(p), 1.0) for x in p]
            q = [math.exp(student_lp[b, t, i]) for i in support]
            p.append(max(0.0, 1 - sum(p)))
            q.append(max(EPS, 1 - sum(q)))
            total += naive_divergence(p, q, kind, beta)
            count += 1
    return total / max(count, 1), count


def run_sparse(case, kind, beta=0.5, grad=False, dtype=torch.float64):
    student_lp, sampled, topk_ids, topk_lp, teacher_sampled, mask = case
    student = tensor(student_lp, dtype, grad=grad)
    out = sparse_divergence_loss(
        student,
        tensor(sampled, torch.long),
        tensor(topk_ids, torch.long),
        tensor(topk_lp),
        tensor(teacher_sampled),
        tensor(mask, torch.bool),
        kind=kind,
        beta=beta,
    )
    return out, student


SPARSE_KINDS = [
    ("forward", 0.5),
    ("reverse", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


@pytest.mark.parametrize(("kind", "beta"), SPARSE_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_divergence_loss_matches_the_naive_formula(kind, beta, seed):
    case = sparse_case(seed)
    out, student = run_sparse(case, kind, beta, grad=True)
    out.loss.backward()

    want, count = naive_sparse(case, kind, beta)
    assert out.loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert out.metrics["valid_tokens"] == count == B * T - 2
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_generalised_jsd_ends_are_the_two_kls():
    case = sparse_case(3)
    forward = run_sparse(case, "forward")[0].loss.item()
    reverse = run_sparse(case, "reverse")[0].loss.item()
    assert run_sparse(case, "jsd", 0.0)[0].loss.item() == forward
    assert run_sparse(case, "jsd", 1.0)[0].loss.item() == reverse
    assert forward != pytest.approx(reverse)


def matching_case(seed: int) -> tuple[np.ndarray, ...]:
    """A student equal to the teacher on the support, with equal tails."""
    rng = np.random.default_rng(seed)
    full = log_softmax(rng.normal(0.0, 1.5, size=(B, T, V)))
    sampled = rng.integers(0, V, size=(B, T))
    topk_ids = np.argsort(-full, axis=-1)[..., :K]
    topk_lp = np.take_along_axis(full, topk_ids, axis=-1)
    teacher_sampled = np.take_along_axis(full, sampled[..., None], -1)[..., 0]
    return full, sampled, topk_ids, topk_lp, teacher_sampled, np.ones((B, T), dtype=bool)


@pytest.mark.parametrize(("kind", "beta"), SPARSE_KINDS)
def test_sparse_divergence_is_zero_when_the_student_matches_the_teacher(kind, beta):
    out, student = run_sparse(matching_case(4), kind, beta, grad=True)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert student.grad.abs().max() < 1e-10  # a minimum: no gradient either


def full_support_case(seed: int, swap: bool) -> tuple[np.ndarray, ...]:
    """The support covers the whole vocabulary, so teacher and student can trade places."""
    rng = np.random.default_rng(seed)
    a = log_softmax(rng.normal(0.0, 1.5, size=(B, T, V)))
    c = log_softmax(rng.normal(0.0, 1.5, size=(B, T, V)))
    teacher, student = (c, a) if swap else (a, c)
    ids = np.broadcast_to(np.arange(V), (B, T, V)).copy()
    sampled = np.zeros((B, T), dtype=np.int64)
    teacher_sampled = teacher[..., 0]
    return student, sampled, ids, teacher, teacher_sampled, np.ones((B, T), dtype=bool)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.7])
def test_generalised_jsd_swaps_beta_when_teacher_and_student_swap(beta):
    straight = run_sparse(full_support_case(5, swap=False), "jsd", beta)[0].loss.item()
    swapped = run_sparse(full_support_case(5, swap=True), "jsd", 1 - beta)[0].loss.item()
    # Both tails are (0, eps) atoms; they change the two values by the same ~eps·log 2.
    assert straight == pytest.approx(swapped, abs=1e-6)
    assert straight > 1e-3


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["forward", "reverse", "jsd"]),
    beta=st.floats(0.0, 1.0),
    logit_scale=st.sampled_from([0.1, 1.0, 8.0]),
)
def test_sparse_divergences_are_never_negative(seed, kind, beta, logit_scale):
    out, student = run_sparse(sparse_case(seed, logit_scale), kind, beta, grad=True)
    out.loss.backward()
    # The student's tail floor can make Σ q exceed 1 by at most eps: a lower bound of −eps.
    assert out.loss.item() >= -EPS
    assert torch.isfinite(student.grad).all()


def test_sparse_gradient_reaches_the_student_only():
    student_lp, sampled, topk_ids, topk_lp, teacher_sampled, mask = sparse_case(6)
    student = tensor(student_lp, grad=True)
    teacher_topk, teacher_s = tensor(topk_lp, grad=True), tensor(teacher_sampled, grad=True)
    out = sparse_divergence_loss(
        student,
        tensor(sampled, torch.long),
        tensor(topk_ids, torch.long),
        teacher_topk,
        teacher_s,
        tensor(mask, torch.bool),
        kind="jsd",
    )
    out.loss.backward()
    assert teacher_topk.grad is None and teacher_s.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_sparse_divergence_works_in_bfloat16():
    out, student = run_sparse(sparse_case(7), "forward", dtype=torch.bfloat16, grad=True)
    out.loss.backward()
    want, _ = naive_sparse(sparse_case(7), "forward", 0.5)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(want, rel=0.05)
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


def test_sparse_metrics_report_support_masses():
    case = sparse_case(8)
    out, _ = run_sparse(case, "reverse")
    assert 0.0 < out.metrics["student_support_mass"] < 1.0
    assert 0.0 < out.metrics["teacher_support_mass"] <= 1.2  # (1, 0) holds a sum above 1
    assert out.metrics["divergence"] == pytest.approx(out.loss.item())


# -- every loss --------------------------------------------------------------------------------


def all_losses(mask_BT: torch.Tensor) -> list[tuple[LossOutput, torch.Tensor]]:
    rng = np.random.default_rng(9)
    lp = tensor(np.log(rng.uniform(0.1, 1.0, size=(B, T))))
    nan = torch.full((B, T), math.nan, dtype=torch.float64)
    outputs = []
    student = lp.clone().requires_grad_(True)
    outputs.append((reverse_kl_advantage_loss(student, lp, nan, mask_BT), student))
    student = lp.clone().requires_grad_(True)
    chunks = torch.zeros(B, T, dtype=torch.long)
    chunk_lp = torch.full((B, 1), -1.0, dtype=torch.float64)
    outputs.append((semantic_prior_loss(student, lp, chunks, chunk_lp, mask_BT), student))
    case = sparse_case(9)
    for kind in ("forward", "reverse", "jsd"):
        student_lp, sampled, topk_ids, topk_lp, teacher_sampled, case_mask = case
        student = tensor(student_lp, grad=True)
        out = sparse_divergence_loss(
            student,
            tensor(sampled, torch.long),
            tensor(topk_ids, torch.long),
            tensor(topk_lp),
            tensor(teacher_sampled),
            mask_BT & tensor(case_mask, torch.bool),  # (1, 1) holds an id outside the vocabulary
            kind=kind,
        )
        outputs.append((out, student))
    return outputs


def test_no_valid_token_gives_a_zero_loss_that_still_backpropagates():
    for out, student in all_losses(torch.zeros(B, T, dtype=torch.bool)):
        assert out.loss.item() == 0.0
        assert out.loss.requires_grad
        out.loss.backward()
        assert torch.all(grad_of(student) == 0)
        assert out.metrics["valid_tokens"] == 0
        assert all(math.isfinite(v) for v in out.metrics.values())


def test_loss_output_is_frozen_and_metrics_are_plain_floats():
    for out, _ in all_losses(torch.ones(B, T, dtype=torch.bool)):
        assert out.loss.dim() == 0
        assert all(type(v) is float for v in out.metrics.values())
        with pytest.raises(dataclasses.FrozenInstanceError):
            out.loss = torch.zeros(())


def semantic_with(**options):
    zeros = torch.zeros(1, 2)
    chunks, sums = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1)
    return semantic_prior_loss(zeros, zeros, chunks, sums, zeros.bool(), **options)


def sparse_with(**options):
    ids = torch.zeros(1, 2, K, dtype=torch.long)
    return sparse_divergence_loss(
        torch.zeros(1, 2, V), ids[..., 0], ids, torch.zeros(1, 2, K), torch.zeros(1, 2),
        torch.ones(1, 2, dtype=torch.bool), **options,
    )  # fmt: skip


def reverse_kl_with(*tensors, **options):
    return reverse_kl_advantage_loss(*(tensors or [torch.zeros(1, 2)] * 4), **options)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: reverse_kl_with(clip="pop"), "clip must"),
        (lambda: reverse_kl_with(discount=1.5), "discount"),
        (lambda: reverse_kl_with(clip_eps=0.0), "clip_eps"),
        (lambda: reverse_kl_with(*[torch.zeros(1, 2)] * 3, torch.zeros(1, 3)), "shapes"),
        (lambda: semantic_with(dual_clip=1.0), "dual_clip"),
        (lambda: semantic_with(clamp=0.0), "clamp"),
        (lambda: sparse_with(kind="jsd", beta=1.5), "beta"),
        (lambda: sparse_with(kind="kl"), "kind"),
        (lambda: position_mask(torch.ones(1, 2), min_mapped_mass=0.5), "mapped_mass_BT"),
        (lambda: position_mask(torch.ones(1, 2), require_exact=True), "exact_BT"),
    ],
)
def test_losses_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- position_mask ---------------------------------------------------------------------------------


def test_position_mask_drops_unscored_low_mass_and_inexact_positions():
    scored = torch.tensor([[True, True, True, True, True, False]])
    teacher = torch.tensor([[-0.1, math.nan, -math.inf, -2.0, -1.0, -1.0]])
    mapped = torch.tensor([[0.9, 0.9, 0.9, 0.4, math.nan, 0.9]])
    exact = torch.tensor([[True, True, True, True, True, True]])
    exact_some = torch.tensor([[False, True, True, True, True, True]])

    assert position_mask(scored).tolist() == scored.tolist()
    assert position_mask(scored, teacher_logprobs_BT=teacher).tolist() == [
        [True, False, False, True, True, False]
    ]
    assert position_mask(scored, mapped_mass_BT=mapped).tolist() == [
        [True, True, True, True, False, False]
    ]
    assert position_mask(scored, mapped_mass_BT=mapped, min_mapped_mass=0.5).tolist() == [
        [True, True, True, False, False, False]
    ]
    assert position_mask(scored, exact_BT=exact_some).tolist() == scored.tolist()
    assert position_mask(scored, exact_BT=exact, require_exact=True).tolist() == scored.tolist()
    assert position_mask(scored, exact_BT=exact_some, require_exact=True).tolist() == [
        [False, True, True, True, True, False]
    ]
