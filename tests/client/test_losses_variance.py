"""The low-variance estimators against naive loop formulas: the candidate reverse KL (§4b), the
leave-one-out group baseline and the per-position baseline; and the property that matters, an
exact gradient beside the estimate: on a known pair the candidate loss's gradient is the exact
per-position reverse-KL gradient, and the baselines cut the sampled estimator's variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenbridge.client.losses import (
    candidate_reverse_kl_loss,
    group_baseline,
    position_baseline,
    reverse_kl_advantage_loss,
    with_teacher_support,
)

B, T, V, C = 3, 4, 9, 4
EPS = 1e-6


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def candidate_case(seed: int):
    rng = np.random.default_rng(seed)
    student = log_softmax(rng.normal(0, 1.5, size=(B, T, V)))
    teacher = log_softmax(rng.normal(0, 2.0, size=(B, T, V)))
    ids = np.stack([[rng.permutation(V)[:C] for _ in range(T)] for _ in range(B)])
    teacher_c = np.take_along_axis(teacher, ids, axis=-1)
    unresolved = np.zeros((B, T, C))
    mask = np.ones((B, T), dtype=bool)
    ids[0, 1, 3], teacher_c[0, 1, 3] = -1, -np.inf  # padding
    ids[0, 2, 2], teacher_c[0, 2, 2] = ids[0, 2, 0], teacher_c[0, 2, 0]  # a repeat
    teacher_c[1, 0, 1] = -np.inf  # a candidate the teacher gives nothing
    unresolved[1, 2, 0] = 0.05  # mass that may belong to it
    mask[2, 3] = False
    teacher_c[2, 0, 0] = np.nan  # unscored row: dropped
    return student, ids, teacher_c, unresolved, mask


def naive_candidate(student, ids, teacher_c, unresolved, mask):
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            seen: dict[int, tuple[float, float]] = {}
            for c in range(C):
                if ids[b, t, c] >= 0:
                    seen.setdefault(int(ids[b, t, c]), (teacher_c[b, t, c], unresolved[b, t, c]))
            if not seen or any(math.isnan(v) for v, _ in seen.values()):
                continue
            p = [math.exp(v) + 0.5 * u for v, u in seen.values()]
            p = [x / max(sum(p), 1.0) for x in p]
            p.append(max(0.0, 1 - sum(p)))
            floored = [max(x, EPS) for x in p]
            floored = [x / sum(floored) for x in floored]
            q = [math.exp(student[b, t, i]) for i in seen]
            q.append(max(EPS, 1 - sum(q)))
            total += sum(x * math.log(x / y) for x, y in zip(q, floored, strict=True) if x > 0)
            count += 1
    return total / max(count, 1), count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidate_reverse_kl_matches_the_naive_formula(seed):
    student, ids, teacher_c, unresolved, mask = candidate_case(seed)
    leaf = torch.tensor(student, requires_grad=True)
    out = candidate_reverse_kl_loss(
        leaf, torch.tensor(ids), torch.tensor(teacher_c), torch.tensor(mask),
        teacher_unresolved_BTC=torch.tensor(unresolved),
    )  # fmt: skip
    want, count = naive_candidate(student, ids, teacher_c, unresolved, mask)
    assert out.loss.item() == pytest.approx(want, rel=1e-10)
    assert out.metrics["valid_tokens"] == count == B * T - 2
    out.loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_with_every_id_a_candidate_the_gradient_is_the_exact_reverse_kl_gradient():
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(0, 1.0, size=(B, T, V)), requires_grad=True)
    teacher = torch.log_softmax(torch.tensor(rng.normal(0, 2.0, size=(B, T, V))), -1)
    ids = torch.arange(V).expand(B, T, V)
    out = candidate_reverse_kl_loss(
        torch.log_softmax(logits, -1), ids, teacher, torch.ones(B, T, dtype=torch.bool)
    )
    (estimate,) = torch.autograd.grad(out.loss, logits)
    q = torch.log_softmax(logits, -1)
    exact_loss = (q.exp() * (q - teacher)).sum(-1).mean()
    (exact,) = torch.autograd.grad(exact_loss, logits)
    assert out.loss.item() == pytest.approx(exact_loss.item(), rel=1e-5)
    torch.testing.assert_close(estimate, exact, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_with_the_sampled_token_the_expected_gradient_is_the_full_reverse_kl_gradient(seed):
    """A broad student whose top-2 holds little of its mass: the expectation of the estimate
    over the sampled token (enumerated, weighted by the student's probability) is the full
    per-position reverse KL, and so is the expectation of its gradient; the rest atom alone is
    a strict lower bound with another gradient."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 0.3, size=(1, 1, V)), requires_grad=True)
    teacher = torch.log_softmax(torch.tensor(rng.normal(0, 2.0, size=(1, 1, V))), -1)
    q = torch.log_softmax(logits, -1)
    ids = torch.topk(q.detach(), k=2, dim=-1).indices
    teacher_c = teacher.gather(-1, ids)
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = torch.zeros(())
    expected_grad = torch.zeros_like(logits)
    for y in range(V):
        out = candidate_reverse_kl_loss(
            q, ids, teacher_c, mask, sampled_ids_BT=torch.tensor([[y]]),
            teacher_sampled_logprobs_BT=teacher[..., y],
        )  # fmt: skip
        weight = q[0, 0, y].exp().detach()
        expected = expected + weight * out.loss.detach()
        (grad,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
        expected_grad += weight * grad
    exact = (q.exp() * (q - teacher)).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits, retain_graph=True)
    assert expected.item() == pytest.approx(exact.item(), rel=1e-9)
    torch.testing.assert_close(expected_grad, exact_grad, rtol=1e-6, atol=1e-9)
    coarse = candidate_reverse_kl_loss(q, ids, teacher_c, mask).loss
    assert coarse.item() < exact.item() - 0.01
    (coarse_grad,) = torch.autograd.grad(coarse, logits)
    assert (coarse_grad - exact_grad).abs().max() > 0.05


def test_the_sampled_token_among_the_candidates_adds_nothing():
    student, ids, teacher_c, _, mask = candidate_case(0)
    args = (torch.tensor(student), torch.tensor(ids), torch.tensor(teacher_c), torch.tensor(mask))
    plain = candidate_reverse_kl_loss(*args)
    sampled = torch.tensor(ids[..., 0]).clamp(min=0)
    with_sampled = candidate_reverse_kl_loss(
        *args, sampled_ids_BT=sampled, teacher_sampled_logprobs_BT=torch.zeros(B, T)
    )
    assert with_sampled.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert with_sampled.metrics["rest_divergence"] == 0.0
    with pytest.raises(ValueError, match="come together"):
        candidate_reverse_kl_loss(*args, sampled_ids_BT=sampled)


def test_teacher_support_keeps_exact_candidates_and_brings_the_teachers_mass_into_the_loss():
    """A broad student whose top-2 misses the teacher's favourite: with the teacher's listed ids
    added, a shared id keeps its exact candidate value, the favourite becomes an atom, the loss
    moves up toward the full reverse KL (a finer partition, data processing), and its gradient
    pushes the favourite's logit up hardest of the ids outside the student's top-2, where the
    rest atom alone could not single it out."""
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(0, 0.3, size=(1, 1, V)), requires_grad=True)
    q = torch.log_softmax(logits, -1)
    ids = torch.topk(q.detach(), k=2, dim=-1).indices
    favourite = int(torch.argmin(q.detach()[0, 0]))
    teacher = torch.full((1, 1, V), -8.0, dtype=torch.float64)
    teacher[0, 0, favourite] = 0.0
    teacher[0, 0, ids[0, 0, 0]] = -1.5
    teacher = torch.log_softmax(teacher, -1)
    teacher_c = teacher.gather(-1, ids)
    topk_ids = torch.tensor([[[favourite, int(ids[0, 0, 0]), -1]]])
    # A §4 lower bound for the shared id, below its exact candidate value.
    topk_lps = torch.tensor([[[teacher[0, 0, favourite].item(), -3.0, -math.inf]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    merged_ids, merged_lps, merged_unres = with_teacher_support(
        ids, teacher_c, torch.zeros_like(teacher_c), topk_ids, topk_lps
    )
    assert merged_ids.shape[-1] == 5 and merged_unres.abs().sum() == 0
    plain = candidate_reverse_kl_loss(q, ids, teacher_c, mask)
    merged = candidate_reverse_kl_loss(q, merged_ids, merged_lps, mask)
    exact = (q.exp() * (q - teacher)).sum()
    assert plain.loss.item() < merged.loss.item() <= exact.item() + 1e-9
    # Only the exact value of the shared id counts: replacing its duplicate changes nothing.
    other = merged_lps.clone()
    other[0, 0, 3] = -0.1
    again = candidate_reverse_kl_loss(q, merged_ids, other, mask)
    assert again.loss.item() == pytest.approx(merged.loss.item(), rel=1e-12)
    (grad_plain,) = torch.autograd.grad(plain.loss, logits, retain_graph=True)
    (grad_merged,) = torch.autograd.grad(merged.loss, logits)
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids[0, 0]] = False
    merged_rest = torch.where(outside, grad_merged[0, 0], math.inf)
    plain_rest = torch.where(outside, grad_plain[0, 0], math.inf)
    assert merged_rest[favourite] < 0 and int(torch.argmin(merged_rest)) == favourite
    assert int(torch.argmin(plain_rest)) != favourite
    unscored = with_teacher_support(
        ids, torch.full_like(teacher_c, math.nan), torch.zeros_like(teacher_c), topk_ids, topk_lps
    )[1]
    assert torch.isnan(unscored).all()
    with pytest.raises(ValueError, match="topk rows"):
        with_teacher_support(
            ids, teacher_c, torch.zeros_like(teacher_c), topk_ids[:, :0], topk_lps[:, :0]
        )


def test_group_baseline_is_the_mean_of_the_other_samples():
    adv = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [5.0, 7.0, 9.0], [4.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    group = torch.tensor([7, 7, 2, 5])
    got = group_baseline(adv, valid, group)
    assert got[0].tolist() == [3.0] * 3  # the other sample of group 7: one token, 3
    assert got[1].tolist() == [1.5] * 3  # tokens 1 and 2
    assert torch.isnan(got[2]).all() and torch.isnan(got[3]).all()  # alone in their groups


def test_position_baseline_matches_the_naive_formula():
    rng = np.random.default_rng(3)
    old = log_softmax(rng.normal(0, 1.0, size=(B, T, V)))
    listed = np.stack([[rng.permutation(V)[:C] for _ in range(T)] for _ in range(B)])
    teacher = np.log(rng.uniform(0.01, 0.3, size=(B, T, C)))
    listed[0, 0, 1] = -1
    teacher[0, 1, 2] = -np.inf
    mask = np.ones((B, T), dtype=bool)
    mask[1, 1] = False
    got = position_baseline(
        torch.tensor(old), torch.tensor(listed), torch.tensor(teacher), torch.tensor(mask)
    ).numpy()
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                assert math.isnan(got[b, t])
                continue
            pairs = [(old[b, t, v], teacher[b, t, k]) for k, v in enumerate(listed[b, t])
                     if v >= 0 and np.isfinite(teacher[b, t, k])]  # fmt: skip
            weight = sum(math.exp(s) for s, _ in pairs)
            want = sum(math.exp(s) * (q - s) for s, q in pairs) / weight
            assert got[b, t] == pytest.approx(want, rel=1e-10)


@pytest.mark.slow  # thousands of sampled gradients
def test_baselines_cut_the_variance_of_the_sampled_gradient_and_keep_its_mean():
    """One position, a known student and teacher: the exact gradient of KL(π‖p) beside the
    sampled estimate, with and without baselines, over many draws."""
    rng = np.random.default_rng(11)
    vocab, draws, group = 6, 4000, 4
    logits = torch.tensor(rng.normal(0, 1.0, size=vocab))
    # A student far from its teacher (reverse KL about 2 nats, as measured for a weak student):
    # the advantage's common part is large, which is what a baseline takes away.
    teacher = torch.log_softmax(torch.tensor(rng.normal(0, 3.0, size=vocab)), -1)
    log_pi = torch.log_softmax(logits, -1)
    assert (log_pi.exp() * (log_pi - teacher)).sum() > 1.5
    exact_logits = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(exact_logits, -1)
    (exact,) = torch.autograd.grad((lp.exp() * (lp - teacher)).sum(), exact_logits)
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(log_pi.exp(), draws * group, replacement=True, generator=generator)
    grads: dict[str, list[torch.Tensor]] = {"none": [], "group": [], "position": []}
    for start in range(0, draws * group, group):
        tokens = samples[start : start + group]
        old = log_pi[tokens][:, None]
        q = teacher[tokens][:, None]
        mask = torch.ones(group, 1, dtype=torch.bool)
        baselines = {
            "none": None,
            "group": group_baseline(q - old, mask, torch.zeros(group, dtype=torch.long)),
            "position": position_baseline(
                log_pi.expand(group, 1, vocab),
                torch.arange(vocab).expand(group, 1, vocab),
                teacher.expand(group, 1, vocab),
                mask,
            ),
        }
        for name, baseline in baselines.items():
            leaf = logits.clone().requires_grad_(True)
            current = torch.log_softmax(leaf, -1)[tokens][:, None]  # group × 1
            out = reverse_kl_advantage_loss(
                current, old, q, mask, clip="none", baseline_BT=baseline
            )
            (grad,) = torch.autograd.grad(out.loss, leaf)
            grads[name].append(grad)
    spread = {}
    for name, values in grads.items():
        stacked = torch.stack(values)
        # Unbiased: the mean estimate is the exact gradient, within its standard error.
        error = stacked.std(0) / math.sqrt(len(values)) * 4 + 1e-3
        assert torch.all((stacked.mean(0) - exact).abs() < error), name
        spread[name] = stacked.var(0).sum().item()
    assert spread["group"] < 0.7 * spread["none"]
    assert spread["position"] < 0.6 * spread["none"]
