"""Training configuration: one frozen dataclass, validated when built.

``tokenbridge train`` generates its flags from ``TrainConfig``; ``--config FILE`` (TOML) gives the
same keys. Environment variables are read only by the command-line entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.client.lora import LoraSettings
from tokenbridge.client.routing import check_schedule
from tokenbridge.shared.configargs import load_toml

__all__ = [
    "BASELINES",
    "DEFAULT_LEARNING_RATES",
    "LOSSES",
    "MIXED_PRECISIONS",
    "SHARDINGS",
    "TrainConfig",
    "load_train_config",
]

#: ``candidate_reverse_kl``: the per-position reverse KL over the student's own top-k, each
#: scored exactly by the teacher from its full row (``docs/mapping.md`` §4b), plus a rest atom;
#: ``reverse_kl``: sampled-token reverse KL as an advantage (telescoped teacher log-probs), with a
#: baseline; ``semantic_prior``: the founding paper's chunk-level target;
#: ``forward_kl``/``sparse_reverse_kl``/``jsd``: divergences over the mapped top-K plus a tail
#: atom; ``sft``: supervised fine-tuning on teacher samples from ``/v1/generate`` (the usual
#: cross-tokenizer baseline).
LOSSES = (
    "candidate_reverse_kl",
    "reverse_kl",
    "semantic_prior",
    "forward_kl",
    "sparse_reverse_kl",
    "jsd",
    "sft",
)
#: Baselines of the sampled-token ``reverse_kl`` advantage: ``auto`` is ``group`` with several
#: samples per prompt, else ``position``.
BASELINES = ("auto", "none", "group", "position")
#: How several ranks under ``torchrun`` hold the student: ``ddp``, a whole copy on each (DDP
#: averages the gradients); ``fsdp``, each rank a shard of every weight, gradient and optimiser
#: state (PyTorch's ``fully_shard``), for students larger than one GPU.
SHARDINGS = ("ddp", "fsdp")
#: ``no``: float32 throughout; ``bf16``: forward and backward in bfloat16, weights, gradient
#: reduction and optimiser state in float32 (FSDP's mixed-precision policy; autocast otherwise).
MIXED_PRECISIONS = ("no", "bf16")
#: The learning rate each loss gets when ``learning_rate`` is not given, chosen from measurements
#: (``bench/learning.py``; docs/trainer.md, "Defaults that teach"): the largest rate of {1e-4, 3e-4}
#: whose 20 steps lowered the exact reverse KL on validation for both an identical and a
#: cross-family pair. The sampled-token ``reverse_kl`` raised it at both rates there: its 1e-4 keeps
#: the damage smallest. ``semantic_prior`` and ``sft`` were not measured: the rates of their
#: neighbours.
#: The teacher's own top ids the default loss adds to the student's candidates (docs/trainer.md,
#: "Acceptance run"): a service that starts its own teacher for training asks at least this
#: ``max_top_k``.
DEFAULT_TEACHER_SUPPORT = 64
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "candidate_reverse_kl": 3e-4,
    "reverse_kl": 1e-4,
    "semantic_prior": 1e-4,
    "forward_kl": 1e-4,
    "sparse_reverse_kl": 1e-4,
    "jsd": 1e-4,
    "sft": 3e-4,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    student: str = field(default="", metadata={"help": "student model folder or hub name"})
    teacher_urls: tuple[str, ...] = field(
        default=("http://127.0.0.1:8000",), metadata={"help": "teacher service URL(s)"}
    )
    api_key: str | None = field(default=None, repr=False, metadata={"help": "service API key"})
    prompts: Path | None = field(
        default=None,
        metadata={"help": "JSONL of prompts ({'prompt': text} or {'messages': [...]}) per line"},
    )
    eval_prompts: int = field(default=8, metadata={"help": "prompts held out for evaluation"})
    loss: str = field(default="candidate_reverse_kl", metadata={"help": " | ".join(LOSSES)})
    top_k: int = field(default=20, metadata={"help": "teacher distribution width (sparse losses)"})
    candidates: int = field(
        default=32,
        metadata={
            "help": "the student's own top-k ids per position that the teacher scores exactly "
            "(candidate_reverse_kl; at most 64)"
        },
    )
    teacher_support: int = field(
        default=DEFAULT_TEACHER_SUPPORT,
        metadata={
            "help": "candidate_reverse_kl: add the teacher's own top ids (its §4 row, this many, "
            "at most the service's max_top_k; 0: none) to the student's candidates, so the rest "
            "atom holds little of either distribution (docs/mapping.md §4b)"
        },
    )
    rest_divergence: bool = field(
        default=False,
        metadata={
            "help": "candidate_reverse_kl: also charge the divergence inside the rest (the "
            "batch's sampled tokens outside the candidates, against the teacher's log-probs) to "
            "the student's rest mass, so that a broad student cannot hide mass there "
            "(docs/mapping.md §4b); off by default, see docs/trainer.md, acceptance run"
        },
    )
    samples_per_prompt: int = field(
        default=1, metadata={"help": "completions sampled per prompt (a group, for baselines)"}
    )
    baseline: str = field(
        default="auto",
        metadata={
            "help": "reverse_kl advantage baseline: auto (group with several samples per prompt, "
            "else position) | none | group (leave-one-out over the prompt's samples) | "
            "position (the policy's expected advantage over the teacher's listed ids)"
        },
    )
    steps: int = field(default=20, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "prompts per step"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest sampled completion"})
    temperature: float = field(default=1.0, metadata={"help": "student sampling temperature"})
    sampler: str = field(
        default="transformers",
        metadata={"help": "student sampling: transformers (generate) | vllm (weights synced)"},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate (none: the loss's default, DEFAULT_LEARNING_RATES)"},
    )
    warmup_steps: int = field(
        default=10,
        metadata={"help": "linear warm-up steps (Adam's first steps move every weight by the "
                  "full rate: a small start keeps them from undoing the warm start)"},
    )  # fmt: skip
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range"})
    discount: float = field(default=0.0, metadata={"help": "reverse-KL advantage discount"})
    jsd_beta: float = field(default=0.5, metadata={"help": "generalised JSD mixing weight"})
    min_mapped_mass: float = field(
        default=0.0, metadata={"help": "mask positions whose mapped teacher mass is below this"}
    )
    require_exact: bool = field(default=False, metadata={"help": "mask positions not exact"})
    teachers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "names of the service's teachers to distil from (none: its default teacher)"
        },
    )
    teacher_schedule: str = field(
        default="round_robin",
        metadata={
            "help": "round_robin: step s's batch goes to teachers[s %% n] (from 0) | mixture: "
            "each prompt draws a teacher (seeded, --teacher-weights)"
        },
    )
    teacher_weights: tuple[float, ...] = field(
        default=(),
        metadata={"help": "mixture weights, one per teacher, >= 0 (none: uniform)"},
    )
    teacher_field: str = field(
        default="teacher",
        metadata={
            "help": "prompt-file field naming a row's teacher (rows without it follow the "
            "schedule; empty: ignore)"
        },
    )
    teacher_resubmits: int = field(
        default=8,
        metadata={"help": "times a teacher call lost with the teacher is sent again"},
    )
    pipeline_depth: int = field(
        default=1,
        metadata={"help": "rollouts scored ahead while training (0: no overlap); = staleness"},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="cpu", metadata={"help": "student device"})
    out_dir: Path = field(default=Path("runs/student"), metadata={"help": "checkpoints, metrics"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between checkpoints"})
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank: train low-rank adapters (peft) and freeze the student's weights "
            "(0: train every weight)"
        },
    )
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA alpha: the adapters' update is scaled by alpha / r"}
    )
    lora_target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "modules the adapters wrap (none: peft's default for the architecture)"},
    )
    sharding: str = field(
        default="ddp",
        metadata={
            "help": "under torchrun: ddp (a whole student on each rank) | fsdp (each rank holds "
            "a shard of the weights, gradients and optimiser state: students larger than one GPU)"
        },
    )
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "no | bf16: forward and backward in bfloat16, weights, gradient reduction "
            "and optimiser state in float32"
        },
    )
    grad_accum_steps: int = field(
        default=1,
        metadata={
            "help": "micro-batches each step's rollout is split into, their gradients added up "
            "before the one optimiser step (the same gradient as the whole batch, in less memory)"
        },
    )
    export_every_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "write the Hugging Face model folder (out_dir/model) at every checkpoint, "
            "not only when the run ends"
        },
    )
    eval_every: int = field(default=10, metadata={"help": "steps between evaluations"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir's checkpoint"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @property
    def lora(self) -> LoraSettings | None:
        """The LoRA adapters' settings (rank, alpha, target modules), or ``None`` without LoRA."""
        if not self.lora_r:
            return None
        return {"r": self.lora_r, "alpha": self.lora_alpha,
                "target_modules": list(self.lora_target_modules)}  # fmt: skip

    def __post_init__(self) -> None:
        teachers = (self.teachers,) if isinstance(self.teachers, str) else self.teachers
        object.__setattr__(self, "teachers", tuple(teachers))
        object.__setattr__(self, "teacher_weights", tuple(self.teacher_weights))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        problems = []
        if self.sampler not in ("transformers", "vllm"):
            problems.append(f"sampler must be transformers or vllm; got {self.sampler!r}")
        if self.lora_r < 0 or self.lora_alpha < 1:
            problems.append(
                f"lora_r must be >= 0 and lora_alpha >= 1; got {self.lora_r} and {self.lora_alpha}"
            )
        if self.lora_r and self.sampler == "vllm":
            # The vLLM sampler syncs the student's full weights by their names; a peft model's
            # differ. Merging the adapters every step would cost what LoRA saves.
            problems.append("LoRA (lora_r > 0) samples with the transformers sampler only")
        if self.sharding not in SHARDINGS:
            problems.append(f"sharding must be one of {SHARDINGS}; got {self.sharding!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            problems.append(
                f"mixed_precision must be one of {MIXED_PRECISIONS}; got {self.mixed_precision!r}"
            )
        if self.sharding == "fsdp" and self.lora_r:
            # FSDP shards to fit weights that one GPU cannot hold; a LoRA student's trained part
            # is small, and its frozen base fits DDP's copy or is better served by quantisation.
            problems.append("LoRA (lora_r > 0) trains under DDP only; drop --sharding fsdp")
        if self.sharding == "fsdp" and self.sampler == "vllm":
            # The vLLM sampler copies the whole student into its engine on every step.
            problems.append("sharding fsdp samples with the transformers sampler only")
        if not 1 <= self.grad_accum_steps <= self.batch_size:
            # Each micro-batch holds at least one prompt (with all its samples).
            problems.append(
                f"grad_accum_steps must lie in [1, batch_size = {self.batch_size}]; got "
                f"{self.grad_accum_steps}"
            )
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if not self.teacher_urls:
            problems.append("teacher_urls needs at least one URL")
        for name in ("top_k", "steps", "batch_size", "max_new_tokens", "checkpoint_every",
                     "eval_every"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if min(self.pipeline_depth, self.warmup_steps, self.eval_prompts,
               self.teacher_resubmits) < 0:  # fmt: skip
            problems.append(
                "pipeline_depth, warmup_steps, eval_prompts and teacher_resubmits must be >= 0"
            )
        if self.learning_rate is None and self.loss in DEFAULT_LEARNING_RATES:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES[self.loss])
        if self.baseline not in BASELINES:
            problems.append(f"baseline must be one of {BASELINES}; got {self.baseline!r}")
        if self.baseline == "group" and self.samples_per_prompt < 2:
            problems.append("baseline 'group' needs samples_per_prompt >= 2")
        if not 1 <= self.candidates <= 64:
            problems.append("candidates must lie in [1, 64]")
        if self.teacher_support < 0:
            problems.append("teacher_support must be >= 0")
        if self.samples_per_prompt < 1:
            problems.append("samples_per_prompt must be at least 1")
        if (self.learning_rate or 0) <= 0 or self.max_grad_norm <= 0 or self.temperature < 0:
            problems.append("learning_rate and max_grad_norm must be > 0, temperature >= 0")
        if not 0 <= self.discount <= 1 or not 0 < self.jsd_beta < 1:
            problems.append("discount must lie in [0, 1] and jsd_beta in (0, 1)")
        if not 0 <= self.min_mapped_mass <= 1:
            problems.append("min_mapped_mass must lie in [0, 1]")
        problems += check_schedule(self.teachers, self.teacher_schedule, self.teacher_weights)
        if self.teacher_field in ("prompt", "messages"):
            problems.append(
                f"teacher_field {self.teacher_field!r} is the prompt's own field; name another"
            )
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.prompts is not None:
            object.__setattr__(self, "prompts", Path(self.prompts))


def load_train_config(path: Path | str) -> dict[str, Any]:
    """The ``TrainConfig`` keys a TOML file sets (unknown keys are an error that names them)."""
    return load_toml(path, TrainConfig)
