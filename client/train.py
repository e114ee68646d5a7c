"""The student's on-policy trainer: ``main(cfg)`` reads top to bottom.

eval → rollout → score (asynchronously, ``pipeline_depth`` rollouts ahead, so teacher scoring
overlaps sampling and the optimiser step; staleness = depth, reported) → loss → optimiser step →
log → checkpoint. Checkpoints hold the model, optimiser, scheduler, every RNG, the data position
and the rollouts still in the pipeline, so ``resume`` continues exactly where the run stopped.
Under ``torchrun`` each rank samples its own prompts and calls the teacher itself; gradients are
averaged by DDP, or with ``--sharding fsdp`` the student is sharded over the ranks (``parallel``);
rank 0 writes metrics and checkpoints. ``--grad-accum-steps K`` splits each step's rollout into K
micro-batches whose gradients add up to the whole batch's (``step.accumulate_gradients``).

A service may host several teachers by name (``--teachers a b``): each prompt goes to one of them
(``client/routing.py``: the prompt row's own ``teacher`` field, else the schedule), each teacher
gets its share of a step's batch in its own call, and the answers are put back in batch order.
Every metrics line says how many sequences and tokens each teacher scored.

The parts live beside this module: ``data`` (prompts, the stream, routed batches), ``fanout``
(one client per teacher, split and merged calls), ``step`` (one step's loss), ``checkpoints``,
``metrics`` and ``evaluation``.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenbridge.client.checkpoints import CHECKPOINT, set_rng_state, write_checkpoint
from tokenbridge.client.config import TrainConfig
from tokenbridge.client.data import (
    PromptStream,
    load_prompts,
    load_routed_prompts,
    take_routed_batch,
)
from tokenbridge.client.evaluation import evaluate_reverse_kl, ratio_standard_error
from tokenbridge.client.export import MODEL_DIR, export_checkpoint, export_model
from tokenbridge.client.fanout import (
    TEACHER_TOTALS,
    Pending,
    Teachers,
    await_answer,
    groups_of,
    per_teacher_counts,
    usage_flops,
    usage_tokens,
)
from tokenbridge.client.lora import with_adapters
from tokenbridge.client.metrics import METRICS, metrics_writer
from tokenbridge.client.parallel import (
    forward_precision,
    is_sharded,
    load_full_state,
    plain_number,
    shard,
)
from tokenbridge.client.rollout import Prompt, Rollout, sample, wire_prompt
from tokenbridge.client.routing import TeacherRouter
from tokenbridge.client.step import accumulate_gradients, teacher_rollout
from tokenbridge.shared.protocol import DEFAULT_TEACHER
from tokenbridge.shared.vocab import Vocab, build_vocab

#: An evaluation of the student beyond the built-in one: ``(model, tokenizer) -> metrics``.
ExtraEval = Callable[[Any, Any], dict[str, float]]

__all__ = [
    "CHECKPOINT",
    "DEFAULT_TEACHER",
    "METRICS",
    "ExtraEval",
    "PromptStream",
    "TrainSummary",
    "evaluate_reverse_kl",
    "load_prompts",
    "load_routed_prompts",
    "main",
    "ratio_standard_error",
    "take_routed_batch",
]


@dataclass(frozen=True)
class TrainSummary:
    """What a run did: steps, tokens, time waiting on the teacher, final metrics, files.

    ``teachers`` holds each teacher's totals by name (``sequences``, ``by_field``: of those, the
    ones the prompt row routed itself, ``student_tokens``, ``teacher_tokens``, ``teacher_flops``),
    the service's default teacher under its name or ``default``; under ``torchrun``, rank 0's.
    """

    steps: int
    student_tokens: int
    teacher_tokens: int
    teacher_flops: int
    teacher_wait_s: float
    elapsed_s: float
    final_metrics: dict[str, Any]
    metrics_path: Path
    checkpoint_path: Path
    teachers: dict[str, dict[str, int]] = field(default_factory=dict)


def main(cfg: TrainConfig, extra_eval: ExtraEval | None = None) -> TrainSummary:
    """Train ``cfg.student`` against the teacher service; return what the run did.

    ``extra_eval(model, tokenizer)``, when given, adds its metrics (a task's accuracy, say) to
    every evaluation, which then runs even without held-out prompts.
    """
    run = _set_up(cfg)
    if cfg.resume:
        _resume(run)
    teachers = Teachers.start(cfg, run.tokenizer, {r for r in run.all_routes if r is not None})
    try:
        sampler, close_sampler = _sampler(cfg, run.tokenizer)
    except BaseException:
        teachers.close()
        raise
    pipeline = _RolloutPipeline(run, teachers, sampler)
    started = time.perf_counter()
    last: dict[str, Any] = {}
    progress = _progress_bar(run)
    try:
        with metrics_writer(cfg.out_dir / METRICS, run.step, run.rank == 0) as log:
            while run.step < cfg.steps:
                last = _train_step(run, pipeline, teachers)
                # A sharded student's forwards need every rank: all evaluate, rank 0 logs.
                evaluates = run.rank == 0 or is_sharded(run.model)
                if evaluates and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                    last.update(_evaluate(run, teachers, pipeline.eval_names, extra_eval))
                log(last)
                _show_progress(progress, last)
                if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                    _save_run(run, pipeline)
    finally:
        if progress is not None:
            progress.close()
        pipeline.cancel()
        teachers.close()
        close_sampler()
    return _summary(run, last, time.perf_counter() - started)


def _save_run(run: _Run, pipeline: _RolloutPipeline) -> None:
    """The checkpoint, and the Hugging Face folder at the end (every time with
    ``export_every_checkpoint``)."""
    cfg = run.cfg
    write_checkpoint(
        run.checkpoint_path, run.model, run.optimiser, run.scheduler, run.step, run.stream,
        pipeline.queue, run.totals, run.rank, run.world, cfg.student, cfg.lora,
    )  # fmt: skip
    if run.rank == 0 and (run.step == cfg.steps or cfg.export_every_checkpoint):
        if is_sharded(run.model):
            # Rank 0 holds only its shard: the checkpoint just written holds the whole.
            export_checkpoint(cfg.out_dir, cfg.out_dir / MODEL_DIR, cfg.student)
        else:
            export_model(run.model, run.tokenizer, cfg.out_dir / MODEL_DIR)


# -- set-up and resume -----------------------------------------------------------------------------


#: A fresh run's totals.
_NEW_TOTALS = {"student_tokens": 0, "teacher_tokens": 0, "teacher_flops": 0, "teacher_wait_s": 0.0}


@dataclass
class _Run:
    """A run's state: the student and its optimiser, the data, the step and the running totals."""

    cfg: TrainConfig
    rank: int
    world: int
    tokenizer: Any
    model: Any
    #: ``model``, or its DDP wrapper when several ranks train (FSDP shards ``model`` itself).
    trained: Any
    optimiser: Any
    scheduler: Any
    train_prompts: list[Prompt]
    train_routes: list[str | None]
    eval_prompts: list[Prompt]
    eval_routes: list[str | None]
    all_routes: list[str | None]
    stream: PromptStream
    router: TeacherRouter
    #: The tokenizer's vocabulary, for SFT (teacher text in the student's tokens).
    vocab: Vocab | None
    step: int = 0
    #: Rollouts that were in the pipeline when the resumed checkpoint was written.
    pending_states: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=lambda: dict(_NEW_TOTALS))

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.out_dir / CHECKPOINT

    @property
    def by_teacher(self) -> dict[str, dict[str, int]]:
        """Each teacher's running totals (kept inside ``totals``, so checkpoints carry them)."""
        return self.totals.setdefault("teachers", {})


def _set_up(cfg: TrainConfig) -> _Run:
    """Seeds, the student (DDP-wrapped or sharded on several ranks), the optimiser with its linear
    warm-up, and the prompts: the first ``eval_prompts`` held out, the rest a seeded stream."""
    rank, world = _distributed()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    tokenizer, model = _load_student(cfg)
    trained = shard(model, cfg.sharding, cfg.mixed_precision, world)
    assert cfg.learning_rate is not None  # TrainConfig fills in the loss's default
    # Only what trains (all weights, or the LoRA adapters) gets optimiser state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup)
    )
    prompts, routes = load_routed_prompts(cfg.prompts, cfg.teacher_field, cfg.teachers)
    held_out = cfg.eval_prompts if len(prompts) > cfg.eval_prompts else 0
    return _Run(
        cfg=cfg, rank=rank, world=world, tokenizer=tokenizer, model=model, trained=trained,
        optimiser=optimiser, scheduler=scheduler,
        train_prompts=prompts[held_out:], train_routes=routes[held_out:],
        eval_prompts=prompts[:held_out], eval_routes=routes[:held_out], all_routes=routes,
        # Each rank reads its own slice of every step's prompts: positions interleave by rank.
        stream=PromptStream(prompts[held_out:], cfg.seed),
        router=TeacherRouter(cfg.teachers, cfg.teacher_schedule, cfg.teacher_weights, cfg.seed),
        vocab=build_vocab(tokenizer) if cfg.loss == "sft" else None,
    )  # fmt: skip


def _resume(run: _Run) -> None:
    """Load the checkpoint into ``run``: weights, optimiser, scheduler, this rank's random state,
    data position and pipeline, the step and the totals."""
    if not run.checkpoint_path.exists():
        raise FileNotFoundError(f"--resume given but {run.checkpoint_path} does not exist")
    state = torch.load(run.checkpoint_path, weights_only=False)
    load_full_state(run.model, run.optimiser, state["model"], state["optimiser"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][run.rank])
    run.stream.position = state["data_position"][run.rank]
    run.step = state["step"]
    run.pending_states = state["pending"][run.rank]
    run.totals = state["totals"]


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _load_student(cfg: TrainConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.student:
        raise ValueError("no student given: pass --student PATH_OR_HUB")
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
    if cfg.lora is not None:
        model = with_adapters(model, cfg.lora)
    # transformers types ``PreTrainedModel.to`` through a decorator that mypy misreads.
    return tokenizer, model.to(cfg.device)  # type: ignore[arg-type]


def _sampler(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any]:
    """The sampling function and what closes it: ``rollout.sample``, or a vLLM engine's
    ``sample`` (it syncs the training model's weights into vLLM on every call)."""
    if cfg.sampler == "transformers":
        return sample, lambda: None
    from transformers import AutoConfig

    from tokenbridge.client.vllm_sampler import VLLMSampler

    config = AutoConfig.from_pretrained(cfg.student)
    positions: int = (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or 4096
    )
    engine = VLLMSampler(cfg.student, tokenizer, seed=cfg.seed, max_model_len=min(4096, positions))
    return engine.sample, engine.close


# -- the pipeline of rollouts ----------------------------------------------------------------------


class _RolloutPipeline:
    """Rollouts sampled ahead and in flight to their teachers, ``pipeline_depth`` ahead of the
    step that trains on the oldest."""

    def __init__(self, run: _Run, teachers: Teachers, sampler: Any) -> None:
        self.run = run
        self.teachers = teachers
        self.sampler = sampler
        self.queue: deque[Pending] = deque()
        cfg = run.cfg
        # Rollouts that were in the pipeline when the checkpoint was written: scored again (the
        # teacher is deterministic) by the teachers they were routed to, never sampled again, so
        # no step is lost or repeated.
        for saved in run.pending_states:
            rollout = Rollout.from_state(saved["rollout"])
            count = len(rollout.prompts)
            # Checkpoints from before named teachers: everything went to the default teacher.
            routes = [teachers.known(n) for n in saved.get("routes", [None] * count)]
            fielded = saved.get("fielded", [False] * count)
            self.queue.append(self.submit(rollout, saved["seed"], routes, fielded))
        # Held-out prompts that name no teacher are spread over the teachers in turn, whatever
        # the schedule: each teacher's distance to the student is then measured on some of them.
        self.eval_names = [
            teachers.name(
                r if r is not None or not cfg.teachers else cfg.teachers[i % len(cfg.teachers)]
            )
            for i, r in enumerate(run.eval_routes)
        ]

    def submit_part(
        self, rollout: Rollout, seed: int, name: str, indexes: list[int]
    ) -> Future[Any]:
        """One teacher's call for the prompts at ``indexes``: scoring, or for SFT generation."""
        client = self.teachers.clients[name]
        if self.run.cfg.loss == "sft":
            # The teacher writes the completions; the student's tokens of them are the rollout.
            # Prompt i of the batch is sampled with seed + i when one teacher takes the batch.
            prompts = [wire_prompt(rollout.prompts[i]) for i in indexes]
            return client.submit_generate(
                prompts, self.run.cfg.max_new_tokens, seed=seed + indexes[0]
            )
        sequences = rollout.score_sequences()
        return client.submit_score([sequences[i] for i in indexes])

    def submit(
        self, rollout: Rollout, seed: int, routes: Sequence[str], fielded: Sequence[bool]
    ) -> Pending:
        """Every teacher's call for ``rollout``, in flight."""
        futures = {
            name: self.submit_part(rollout, seed, name, idx)
            for name, idx in groups_of(routes).items()
        }
        return Pending(rollout, seed, tuple(routes), tuple(fielded), futures)

    def next(self) -> Pending:
        """The oldest rollout, after topping the pipeline up (sampling happens here)."""
        while len(self.queue) < self.run.cfg.pipeline_depth + 1:
            self.queue.append(self._new_rollout())
        return self.queue.popleft()

    def _new_rollout(self) -> Pending:
        run, cfg = self.run, self.run.cfg
        seed = cfg.seed * 1_000_003 + run.stream.position
        taken = take_routed_batch(
            run.stream, run.router, run.train_routes, cfg.batch_size, run.world, run.rank
        )
        # Each prompt's samples sit next to each other: a group for the baselines.
        taken = [item for item in taken for _ in range(cfg.samples_per_prompt)]
        prompts = [run.train_prompts[index] for index, _, _ in taken]
        routes = [self.teachers.name(route) for _, route, _ in taken]
        fielded = [by_field for _, _, by_field in taken]
        if cfg.loss == "sft":
            return self.submit(Rollout(prompts, [], [], []), seed, routes, fielded)
        with forward_precision(run.model, cfg.mixed_precision):
            rollout = self.sampler(
                run.model, run.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                candidates=cfg.candidates if cfg.loss == "candidate_reverse_kl" else 0,
            )  # fmt: skip
        return self.submit(rollout, seed, routes, fielded)

    def cancel(self) -> None:
        """Cancel the calls still in flight."""
        for pending in self.queue:
            for future in pending.futures.values():
                future.cancel()


# -- one step --------------------------------------------------------------------------------------


def _train_step(run: _Run, pipeline: _RolloutPipeline, teachers: Teachers) -> dict[str, Any]:
    """Wait for the oldest rollout's answers, take one optimiser step on them, add up the totals;
    the step's metrics record."""
    cfg, totals = run.cfg, run.totals
    step_started = time.perf_counter()
    pending = pipeline.next()
    rollout = pending.rollout
    waited = time.perf_counter()
    answer = await_answer(pending, pipeline.submit_part, cfg.teacher_resubmits, totals)
    wait_s = time.perf_counter() - waited
    teacher_tokens = usage_tokens(answer)
    scored = None
    if cfg.loss == "sft":
        assert run.vocab is not None
        rollout = teacher_rollout(run.tokenizer, run.vocab, rollout.prompts, answer)
    else:
        scored = list(answer.sequences)
    run.optimiser.zero_grad(set_to_none=True)
    output = accumulate_gradients(cfg, run.trained, rollout, scored)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimiser.step()
    run.scheduler.step()
    run.step += 1
    step_s = time.perf_counter() - step_started
    per_teacher = per_teacher_counts(pending, answer, rollout)
    for name, record in per_teacher.items():
        kept = run.by_teacher.setdefault(name, {})
        for key in TEACHER_TOTALS:
            kept[key] = kept.get(key, 0) + int(record[key])
    totals["student_tokens"] += rollout.tokens
    totals["teacher_tokens"] += teacher_tokens
    totals["teacher_flops"] = totals.get("teacher_flops", 0) + usage_flops(answer)
    totals["teacher_engine_s"] = totals.get("teacher_engine_s", 0.0) + float(
        answer.usage.get("teacher_engine_s") or 0.0
    )
    totals["teacher_wait_s"] += wait_s
    return {
        "step": run.step,
        "loss": float(output.loss.detach()),
        **{k: float(v) for k, v in output.metrics.items()},
        "grad_norm": plain_number(grad_norm),
        "lr": float(run.scheduler.get_last_lr()[0]),
        "student_tokens": rollout.tokens,
        "tokens_per_s": rollout.tokens / step_s if step_s > 0 else 0.0,
        "step_s": step_s,
        "teacher_wait_s": wait_s,
        "teacher_wait_fraction": wait_s / step_s if step_s > 0 else 0.0,
        "staleness": cfg.pipeline_depth,
        "teacher_tokens_total": totals["teacher_tokens"],
        "teacher_flops_total": totals["teacher_flops"],
        "teacher_engine_s_total": totals["teacher_engine_s"],
        "teacher_resubmits_total": totals.get("resubmits", 0),
        **{
            f"teacher_{name}_total": float(value)
            for name, value in teachers.stats().items()
            if name in ("retries", "failovers", "reregistrations")
        },
        "teachers": per_teacher,
    }


def _evaluate(
    run: _Run, teachers: Teachers, eval_names: list[str], extra_eval: ExtraEval | None
) -> dict[str, Any]:
    """The held-out reverse KL (when prompts are held out) and ``extra_eval``'s metrics."""
    out: dict[str, Any] = {}
    if run.eval_prompts:
        kl = evaluate_reverse_kl(
            run.model, run.tokenizer, teachers.clients, run.eval_prompts,
            run.cfg.max_new_tokens, run.cfg.seed, routes=eval_names,
        )  # fmt: skip
        out.update(kl)
    if extra_eval is not None:
        out.update(extra_eval(run.model, run.tokenizer))
    return out


# -- progress and summary --------------------------------------------------------------------------


def _progress_bar(run: _Run) -> Any:
    """A tqdm bar on rank 0 when ``progress`` is on, else None."""
    if not run.cfg.progress or run.rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.steps, initial=run.step, desc="train", unit="step")


def _show_progress(progress: Any, last: dict[str, Any]) -> None:
    if progress is not None:
        progress.update(1)
        progress.set_postfix(
            loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
            wait=f"{last['teacher_wait_fraction']:.0%}",
        )  # fmt: skip


def _summary(run: _Run, last: dict[str, Any], elapsed_s: float) -> TrainSummary:
    totals = run.totals
    return TrainSummary(
        steps=run.step,
        student_tokens=int(totals["student_tokens"]),
        teacher_tokens=int(totals["teacher_tokens"]),
        teacher_flops=int(totals.get("teacher_flops", 0)),
        teacher_wait_s=float(totals["teacher_wait_s"]),
        elapsed_s=elapsed_s,
        final_metrics=last,
        metrics_path=run.cfg.out_dir / METRICS,
        checkpoint_path=run.checkpoint_path,
        teachers={name: dict(values) for name, values in run.by_teacher.items()},
    )
