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

The parts: ``common`` (``LossOutput``, ``position_mask``, ``discounted_sum`` and the shared
checks), ``sampled`` (estimators on the sampled tokens: the reverse-KL advantage with its group
and per-position baselines, the founding paper's semantic prior) and ``divergence`` (divergences
over distributions: sparse KL/JSD on the teacher's top-K, the reverse KL over the student's own
candidates).
"""

from tokenbridge.client.losses.common import (
    ClipMode,
    DivergenceKind,
    LossOutput,
    discounted_sum,
    position_mask,
)
from tokenbridge.client.losses.divergence import (
    candidate_reverse_kl_loss,
    sparse_divergence_loss,
    with_teacher_support,
)
from tokenbridge.client.losses.sampled import (
    group_baseline,
    position_baseline,
    reverse_kl_advantage_loss,
    semantic_prior_loss,
)

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
    "with_teacher_support",
]
