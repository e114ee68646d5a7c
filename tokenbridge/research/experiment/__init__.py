"""``tokenbridge experiment``: the founding paper's claim, measured in this software.

A teacher is fitted here on worked addition (or Shakespeare, ``--task text``) over one family's
real tokenizer (GPT-2 by default); students of another family (Mistral SentencePiece) and a
same-tokenizer reference student are warm-started alike on a few worked examples. Then every arm
trains for the same steps through the real service (its own process, as a user runs it) and the
real client:

====================== =======================================================================
arm                    what the student learns from
====================== =======================================================================
opd_candidate_kl       its own samples; the reverse KL over its own top ids and the teacher's,
                       its candidates scored exactly by the teacher (the trainer's default)
opd_reverse_kl         its own samples; the teacher's telescoped log-probs as a reverse-KL
                       advantage with a per-position baseline
opd_topk_kl            its own samples; forward KL to the teacher's top-K mapped onto the
                       student's vocabulary, plus a tail atom
opd_semantic_prior     its own samples; the founding paper's chunk-level target
sft                    the teacher's own samples (``/v1/generate``), plain likelihood
same_tokenizer_opd     the default loss for a student on the teacher's tokenizer (the reference)
none                   nothing: the warm start as it is
====================== =======================================================================

Teacher compute is what the service reports for the training calls (never the evaluation ones):
teacher tokens, and FLOPs by one count for prefill (scoring) and decode (generation). Results:
``results.json`` (every curve), ``results.md`` (mean ± std over seeds) and ``results.png``
(metrics against teacher FLOPs). Finished runs are kept and reused when the experiment is run
again with the same settings, so an interrupted experiment loses at most the run in progress.

The package: ``config`` (arms, tasks, ``ExperimentConfig``, presets), ``models`` (the fitted
teacher and warm starts, the splits), ``run`` (``run_experiment``) and ``results`` (summaries,
tables, plot).
"""

from tokenbridge.research.experiment.config import (
    ARMS,
    HEADLINES,
    PRESETS,
    SELECTION_MEASURES,
    TASKS,
    Arm,
    ExperimentConfig,
    ExperimentResult,
    preset_config,
)
from tokenbridge.research.experiment.models import build_models, task_split, warm_start_fit
from tokenbridge.research.experiment.results import (
    before_after_table,
    plot_results,
    results_table,
    summarise,
)
from tokenbridge.research.experiment.run import run_experiment

__all__ = [
    "ARMS",
    "HEADLINES",
    "PRESETS",
    "SELECTION_MEASURES",
    "TASKS",
    "Arm",
    "ExperimentConfig",
    "ExperimentResult",
    "before_after_table",
    "build_models",
    "plot_results",
    "preset_config",
    "results_table",
    "run_experiment",
    "summarise",
    "task_split",
    "warm_start_fit",
]
