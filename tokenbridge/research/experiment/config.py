"""The experiment's settings: its arms, tasks and headline measures, ``ExperimentConfig`` (from
which ``tokenbridge experiment`` generates its flags) and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arm:
    """One method: which student it trains (``cross`` or ``same`` tokenizer) and with which loss
    (``None``: no training); ``split``: it sends 1/split of the batch a step for ``split`` times
    the steps (warm-up and evaluations spaced alike), the same teacher budget spent in smaller
    steps."""

    student: str
    loss: str | None
    label: str
    split: int = 1

    def schedule(self, cfg: ExperimentConfig) -> dict[str, int]:
        """This arm's batch size, steps, warm-up steps and evaluation spacing under ``cfg``."""
        return {
            "batch_size": max(1, cfg.batch_size // self.split),
            "steps": cfg.steps * self.split,
            "warmup_steps": cfg.warmup_steps * self.split,
            "eval_every": cfg.eval_every * self.split,
        }


ARMS: dict[str, Arm] = {
    "opd_candidate_kl": Arm("cross", "candidate_reverse_kl", "cross-tok. OPD, exact candidate KL"),
    # Claim 1 is stated in teacher FLOPs, and scoring a sequence costs what generating it does:
    # the same loss on half the sequences a step, twice the steps, for the same budget.
    "opd_candidate_kl_half_batch": Arm(
        "cross", "candidate_reverse_kl", "cross-tok. OPD, candidate KL, half batch", split=2
    ),
    "opd_reverse_kl": Arm("cross", "reverse_kl", "cross-tok. OPD, sampled reverse KL"),
    "opd_topk_kl": Arm("cross", "forward_kl", "cross-tok. OPD, top-K KL"),
    "opd_semantic_prior": Arm("cross", "semantic_prior", "cross-tok. OPD, semantic prior"),
    "sft": Arm("cross", "sft", "SFT on teacher samples"),
    "same_tokenizer_opd": Arm("same", "candidate_reverse_kl", "same-tok. OPD (reference)"),
    "none": Arm("cross", None, "no distillation"),
}


#: The tasks: worked addition (``tokenbridge.research.task``), and continuing Shakespeare with
#: whole plays held out (``tokenbridge.research.textcont``), where the teacher's distribution
#: is wide.
TASKS = ("arithmetic", "text")

#: Per task, the measure the claims read, and its direction (+1: higher is better): the share of
#: problems solved when the student samples at temperature 1 (as on-policy training samples; its
#: greedy accuracy is reported beside it, but a competent warm start is right 0.8–0.99 of the
#: time greedily, so greedy leaves no room to tell arms apart: the full run of 2026-12-03);
#: bits per byte of the real held-out text.
HEADLINES: dict[str, tuple[str, float]] = {
    "arithmetic": ("sampled_accuracy", 1.0),
    "text": ("bits_per_byte", -1.0),
}
#: Per task, the validation measure each arm's learning rate is chosen by (``val_`` + the key),
#: and its direction. On arithmetic it is the accuracy at temperature 1, not greedy: in the full
#: run of 2026-12-03 seed 0's warm start was already right 0.99 of the time greedily on the
#: validation problems, every arm's choice fell to the smallest rate on the grid, and 60 steps
#: there moved little (docs/experiment.md, "Results"). Sampled at temperature 1 it was right 0.35
#: of the time.
SELECTION_MEASURES: dict[str, tuple[str, float]] = {
    "arithmetic": ("sampled_accuracy", 1.0),
    "text": ("bits_per_byte", -1.0),
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; ``tokenbridge experiment`` generates its flags from it."""

    out_dir: Path = field(default=Path("runs/experiment"), metadata={"help": "results folder"})
    task: str = field(
        default="arithmetic",
        metadata={"help": "arithmetic (worked addition) | text (Shakespeare continuation, "
                  "bits per byte on held-out plays)"},
    )  # fmt: skip
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "student seeds"})
    arms: tuple[str, ...] = field(default=tuple(ARMS), metadata={"help": " | ".join(ARMS)})
    digits: int = field(default=2, metadata={"help": "digits per operand"})
    held_out: int = field(default=200, metadata={"help": "problems no model ever trains on"})
    text_passages: int = field(
        default=20000, metadata={"help": "text task: training passages (the teacher fits on all)"}
    )
    eval_problems: int = field(default=200, metadata={"help": "held-out problems per evaluation"})
    kl_eval_prompts: int = field(
        default=128, metadata={"help": "held-out samples for the reverse KL to the teacher"}
    )
    validation_problems: int = field(
        default=200,
        metadata={"help": "train problems set aside to choose each arm's learning rate on"},
    )
    teacher_tokenizer: str = field(default="gpt2", metadata={"help": "teacher's tokenizer"})
    teacher_architecture: str = field(default="gpt2", metadata={"help": "gpt2 | llama"})
    teacher_hidden: int = field(default=128, metadata={"help": "teacher hidden size"})
    teacher_layers: int = field(default=4, metadata={"help": "teacher layers"})
    teacher_fit_steps: int = field(default=1200, metadata={"help": "teacher training steps"})
    # 0.2, not 0.5: with half its examples corrupted the teacher learns that its steps do not
    # fix the answer, and its temperature-1 answers scatter (0.69 right on the validation
    # problems, against 0.94 at 0.2); distilling that spread taught the student off-by-one
    # sums. At 0.2 it still finds the right answer after a planted error 0.665 of the time
    # (0.155 with no corruption). Chosen on the validation problems (docs/experiment.md, "Models").
    teacher_corrupt: float = field(
        default=0.2,
        metadata={
            "help": "share of the teacher's fitting examples with one wrong digit planted in "
            "their steps, loss on the correct rest only (so it knows the way back off its traces)"
        },
    )
    student_tokenizer: str = field(
        default="mistral-v1", metadata={"help": "cross-tokenizer student's tokenizer"}
    )
    student_architecture: str = field(default="llama", metadata={"help": "gpt2 | llama"})
    student_hidden: int = field(default=64, metadata={"help": "student hidden size"})
    student_layers: int = field(default=2, metadata={"help": "student layers"})
    warm_start_steps: int = field(
        default=600, metadata={"help": "warm-start steps of the cross-tokenizer student"}
    )
    same_warm_start_steps: int | None = field(
        default=None,
        metadata={"help": "warm-start steps of the same-tokenizer student (none: as the "
                  "cross-tokenizer one's); the full preset sets both so that the two start at "
                  "a similar temperature-1 accuracy"},
    )  # fmt: skip
    warm_start_examples: int = field(
        default=4000, metadata={"help": "worked examples the warm start sees"}
    )
    warm_start_target: float | None = field(
        default=None,
        metadata={"help": "arithmetic: fit each warm start (every seed, both students) until its "
                  "temperature-1 accuracy on the validation problems reaches this, checked every "
                  "--warm-start-check-every steps, the step counts then the longest fits (none: "
                  "fixed lengths)"},
    )  # fmt: skip
    warm_start_check_every: int = field(
        default=100, metadata={"help": "steps between a warm start's checks of its target"}
    )
    steps: int = field(default=60, metadata={"help": "training steps per arm"})
    batch_size: int = field(default=32, metadata={"help": "prompts per step"})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "one learning rate for every arm (none: each arm's best of "
                  "--learning-rates on the validation problems, seed 0)"},
    )  # fmt: skip
    learning_rates: tuple[float, ...] = field(
        default=(1e-4, 3e-4, 1e-3),
        metadata={"help": "the grid each arm's learning rate is chosen from"},
    )
    warmup_steps: int = field(
        default=10, metadata={"help": "linear warm-up (a fresh optimiser's first steps are large)"}
    )
    top_k: int = field(default=16, metadata={"help": "teacher distribution width"})
    eval_every: int = field(default=12, metadata={"help": "steps between evaluations"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest completion"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        problems = []
        if self.same_warm_start_steps is not None and self.same_warm_start_steps < 1:
            problems.append("same_warm_start_steps must be at least 1")
        if self.warm_start_target is not None:
            if not 0.0 < self.warm_start_target <= 1.0:
                problems.append("warm_start_target must lie in (0, 1]")
            if self.task != "arithmetic":
                problems.append("warm_start_target needs the arithmetic task (an accuracy)")
        if self.task not in TASKS:
            problems.append(f"unknown task {self.task!r}; known: {list(TASKS)}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            problems.append(f"unknown arms {unknown}; known: {list(ARMS)}")
        if not self.arms or not self.seeds:
            problems.append("an experiment needs at least one arm and one seed")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.arms)) != len(self.arms):
            problems.append("seeds and arms must not repeat")
        if self.eval_problems > self.held_out or self.kl_eval_prompts > self.held_out:
            problems.append("eval_problems and kl_eval_prompts must not exceed held_out")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            problems.append("learning_rates needs at least one rate, all > 0")
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append("learning_rate must be > 0")
        if not 0.0 <= self.teacher_corrupt <= 1.0:
            problems.append("teacher_corrupt must lie in [0, 1]")
        for name in ("steps", "batch_size", "eval_every", "eval_problems", "max_new_tokens",
                     "teacher_fit_steps", "warm_start_steps", "warm_start_examples",
                     "warm_start_check_every",
                     "top_k", "validation_problems", "text_passages"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for who in ("teacher", "student"):
            if getattr(self, f"{who}_hidden") % 32:
                problems.append(f"{who}_hidden must be a multiple of 32 (heads of 32)")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "learning_rates", tuple(self.learning_rates))


#: Named sizes: ``full`` (the numbers of docs/experiment.md; hours here), ``text`` (the same on the
#: text task), ``smoke`` and ``text-smoke`` (CI: minutes, the pipeline end to end) and ``demo``
#: (``make demo``: one seed, the default loss against none).
PRESETS: dict[str, dict[str, Any]] = {
    # Every warm start (each seed, both students) fitted until it is right 0.4 of the time at
    # temperature 1 on the validation problems. Fixed lengths (900 and 1,200 steps, matched on
    # seed 0 only) left seeds 1 and 2 far apart: greedy 0.32 and 0.85 against seed 0's 0.99
    # (the full run of 2026-12-03), a seed spread ten times any arm's effect.
    # The rates: 1e-4 moved nothing beyond noise in 60 steps there (every arm's gain over its
    # start within ±0.02 accuracy), so the grid starts at the demo's 3e-4.
    "full": {"warm_start_steps": 2400, "warm_start_target": 0.4, "learning_rates": (3e-4, 1e-3)},
    "text": {"task": "text"},
    "text-smoke": {
        # A teacher fitted briefly on a few passages: the text pipeline end to end, not a result.
        "task": "text",
        "seeds": (0,),
        "arms": ("none", "opd_candidate_kl", "sft"),
        "text_passages": 600,
        "teacher_fit_steps": 150,
        "warm_start_steps": 30,
        "warm_start_examples": 300,
        "steps": 4,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "eval_every": 2,
        "eval_problems": 24,
        "kl_eval_prompts": 16,
        "validation_problems": 24,
        "max_new_tokens": 24,
    },
    "smoke": {
        # The full teacher (cached, shared with the demo); a weaker warm start that any teacher
        # signal improves within a few steps; tiny arms. The validation split stays the
        # default's: the teacher fits on the train problems the split leaves, so a smaller one
        # (24 until 2026-12-07) made the smoke run and the demo fit two teachers, not share one.
        # With one learning rate the validation problems are never evaluated.
        "seeds": (0,),
        "warm_start_steps": 100,
        "steps": 8,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_problems": 24,
        "kl_eval_prompts": 16,
    },
    "demo": {
        "seeds": (0,),
        "arms": ("none", "opd_candidate_kl"),
        "steps": 80,
        "eval_every": 40,
        "learning_rate": 3e-4,
    },
}


@dataclass(frozen=True)
class ExperimentResult:
    """What an experiment wrote: its summary (also in ``results.json``) and its files."""

    summary: dict[str, Any]
    results_json: Path
    table_path: Path
    plot_path: Path


def preset_config(name: str, **overrides: Any) -> ExperimentConfig:
    """The named preset with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    return replace(ExperimentConfig(), **{**PRESETS[name], **overrides})
