"""The yardstick of the learning tests, against the formulas written out: both directions of the
exact per-position KL of a model's full rows to fixed teacher rows (``tokenbridge/research/
exactkl.py``), on a small real torch model whose rows are known in closed form."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenbridge.research.exactkl import TeacherTargets, exact_reverse_kl

V = 7


class BigramModel(torch.nn.Module):
    """Next-token logits that depend on the current token only: row ``t`` is ``table[ids[t]]``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=generator, dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _case(seed: int) -> tuple[BigramModel, TeacherTargets, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    model = BigramModel(seed)
    prompts = [[1, 2], [3]]
    completions = [[4, 0, 6], [5, 5]]
    rows = [np.array([0, 2]), np.array([0, 1])]  # position 1 of the first sequence left out
    log_p = []
    for row in rows:
        logits = rng.normal(0, 2.0, size=(len(row), V))
        log_p.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    log_q = []
    table = model.table.detach().numpy()
    for prompt, completion, kept in zip(prompts, completions, rows, strict=True):
        # Row t reads the token before completion token t.
        context = (prompt + completion)[len(prompt) - 1 : -1]
        logits = table[np.asarray(context)[kept]]
        log_q.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    return model, TeacherTargets(prompts, completions, rows, log_p), log_q


@pytest.mark.parametrize("seed", [0, 1])
def test_both_directions_match_the_formulas(seed):
    model, targets, log_q = _case(seed)
    reverse = exact_reverse_kl(model, targets)
    forward = exact_reverse_kl(model, targets, direction="forward")
    for got_r, got_f, q, p in zip(
        reverse.per_position, forward.per_position, log_q, targets.log_p, strict=True
    ):
        np.testing.assert_allclose(got_r, (np.exp(q) * (q - p)).sum(-1), rtol=1e-5)
        np.testing.assert_allclose(got_f, (np.exp(p) * (p - q)).sum(-1), rtol=1e-5)
    # Different divergences, both positive: a swapped direction would not pass the lines above.
    assert reverse.mean > 0 and forward.mean > 0 and reverse.mean != pytest.approx(forward.mean)


def test_an_unknown_direction_is_refused():
    model, targets, _ = _case(0)
    with pytest.raises(ValueError, match="direction"):
        exact_reverse_kl(model, targets, direction="backward")
