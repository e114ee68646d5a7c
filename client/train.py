"""The student's on-policy trainer: ``main(cfg)`` reads top to bottom.

eval → rollout → score (asynchronously, ``pipeline_depth`` rollouts ahead, so teacher scoring
overlaps sampling and the optimiser step; staleness = depth, reported) → loss → optimiser step →
log → checkpoint. Checkpoints hold the model, optimiser, scheduler, every RNG, the data position
and the rollouts still in the pipeline, so ``resume`` continues exactly where the run stopped.
Under ``torchrun`` each rank samples its own prompts and calls the teacher itself; gradients are
averaged by DDP; rank 0 writes metrics and checkpoints.

A service may host several teachers by name (``--teachers a b``): each prompt goes to one of them
(``client/routing.py``: the prompt row's own ``teacher`` field, else the schedule), each teacher
gets its share of a step's batch in its own call, and the answers are put back in batch order.
Every metrics line says how many sequences and tokens each teacher scored.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenbridge.client import losses
from tokenbridge.client.config import TrainConfig
from tokenbridge.client.errors import TeacherProtocolError, TeacherUnavailableError
from tokenbridge.client.rollout import (
    Prompt,
    Rollout,
    completion_logprobs,
    render_student_prompt,
    sample,
    wire_prompt,
)
from tokenbridge.client.routing import TeacherRouter, check_teacher_name
from tokenbridge.client.teacher import (
    Completion,
    GenerateResult,
    ScoreResult,
    SyncTeacherClient,
    TeacherClientConfig,
)
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.errors import AlignmentError
from tokenbridge.shared.protocol import DEFAULT_TEACHER, ScoredSequence
from tokenbridge.shared.vocab import Vocab, build_vocab

#: An evaluation of the student beyond the built-in one: ``(model, tokenizer) -> metrics``.
ExtraEval = Callable[[Any, Any], dict[str, float]]

__all__ = [
    "DEFAULT_TEACHER",
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

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

DEFAULT_PROMPTS: tuple[str, ...] = tuple(
    f"{speaker}.\n{line}"
    for speaker, line in (
        ("HAMLET", "To be, or not to be,"),
        ("OPHELIA", "Good my lord,"),
        ("HORATIO", "Hail to your lordship!"),
        ("POLONIUS", "Though this be madness,"),
        ("GERTRUDE", "Good Hamlet, cast thy nighted colour off,"),
        ("CLAUDIUS", "Though yet of Hamlet our dear brother's death"),
        ("LAERTES", "My necessaries are embark'd."),
        ("MARCELLUS", "Something is rotten in the state of Denmark."),
        ("GHOST", "Mark me."),
        ("BERNARDO", "Who's there?"),
        ("FRANCISCO", "Nay, answer me."),
        ("ROSENCRANTZ", "My honoured lord!"),
    )
)


# -- data ------------------------------------------------------------------------------------------


def load_prompts(path: Path | None) -> list[Prompt]:
    """Prompts from a JSONL file (``{"prompt": text}`` or ``{"messages": [...]}`` per line), or a
    small built-in set of Shakespeare openings when no file is given. Other fields of a row (its
    teacher, say) are ignored: ``load_routed_prompts`` reads that too."""
    return load_routed_prompts(path, teacher_field="")[0]


def load_routed_prompts(
    path: Path | None, teacher_field: str = "teacher", teachers: Sequence[str] = ()
) -> tuple[list[Prompt], list[str | None]]:
    """``load_prompts``, and each row's own teacher: the name its ``teacher_field`` holds, or
    ``None`` (no field, ``null``, or ``teacher_field`` empty) for a row the schedule routes.

    With ``teachers`` given, a row naming another teacher is an error that names its line, as is
    a value that is not a teacher name.
    """
    if path is None:
        return list(DEFAULT_PROMPTS), [None] * len(DEFAULT_PROMPTS)
    prompts: list[Prompt] = []
    routes: list[str | None] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise ValueError(f"{path}:{number}: needs 'prompt' (text) or 'messages' (a list)")
        requested = item.get(teacher_field) if teacher_field else None
        if requested is not None:
            try:
                check_teacher_name(requested, f"'{teacher_field}'")
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            if teachers and requested not in teachers:
                raise ValueError(
                    f"{path}:{number}: '{teacher_field}' routes the prompt to teacher "
                    f"{requested!r}, which is not among the teachers {list(teachers)}: add it "
                    "to --teachers or change the row"
                )
        routes.append(requested)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts, routes


class PromptStream:
    """An endless, seeded, reshuffled-per-epoch stream of prompts; its position is checkpointed."""

    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._epoch_order: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:  # one shuffle per epoch, not per prompt
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._epoch_order = epoch, order
        return self._epoch_order

    def take(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts."""
        return [self.prompts[index] for _, index in self.take_indexed(count)]

    def take_indexed(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` prompts as (stream position, index into ``prompts``) pairs: what
        routing by the prompt's position or by its row needs."""
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            out.append((self.position, self._order(epoch)[index]))
            self.position += 1
        return out


def take_routed_batch(
    stream: PromptStream,
    router: TeacherRouter,
    row_teachers: Sequence[str | None],
    batch_size: int,
    world: int = 1,
    rank: int = 0,
) -> list[tuple[int, str | None, bool]]:
    """This rank's prompts of the next step, each as (index into the stream's prompts, its
    teacher, whether its row chose that teacher rather than the schedule).

    Every rank takes the whole step's ``batch_size * world`` prompts from the stream and keeps
    its slice, so positions, and with them the routing, are those of a single-rank run. The
    round-robin step is the stream position over the step's size: a resumed run (whose stream
    restarts at the saved position) routes as if it had never stopped.
    """
    step_index = stream.position // (batch_size * world)
    taken = stream.take_indexed(batch_size * world)[rank::world]
    return [
        (
            index,
            router.route(step_index, position, row_teachers[index]),
            row_teachers[index] is not None,
        )
        for position, index in taken
    ]


# -- one step's loss -------------------------------------------------------------------------------


def _padded(values: list[np.ndarray], width: int, fill: float, dtype: Any) -> torch.Tensor:
    out = np.full((len(values), width, *values[0].shape[1:]) if values else (0, width), fill)
    for b, row in enumerate(values):
        out[b, : len(row)] = row
    return torch.as_tensor(out, dtype=dtype)


def _sampled_rest(
    rollout: Rollout, width: int, teacher_BT: torch.Tensor, old_BT: torch.Tensor
) -> dict[str, Any]:
    """The sampled tokens, the teacher's and the sampling policy's log-probs of them, for the
    candidate loss's rest term."""
    sampled_BT = _padded(
        [np.asarray(ids, dtype=np.int64) for ids in rollout.completion_ids], width, -1, torch.long
    )
    return {
        "sampled_ids_BT": sampled_BT.to(teacher_BT.device),
        "teacher_sampled_logprobs_BT": teacher_BT,
        "old_logprobs_BT": old_BT,
    }


def _batch_loss(
    cfg: TrainConfig, model: Any, rollout: Rollout, scored: list[ScoredSequence]
) -> losses.LossOutput:
    """The configured loss of one scored rollout, with gradients into ``model``."""
    full = cfg.loss in ("forward_kl", "sparse_reverse_kl", "jsd", "candidate_reverse_kl") or (
        cfg.loss == "reverse_kl" and _baseline(cfg) == "position"
    )
    logprobs_BT, valid_BT, logprobs_BTV = completion_logprobs(
        model, rollout.prompt_ids, rollout.completion_ids, full=full
    )
    width = logprobs_BT.shape[1]
    device = logprobs_BT.device
    old_BT = _padded(rollout.old_logprobs, width, 0.0, torch.float32).to(device)
    teacher_BT = _padded([s.logprobs_S for s in scored], width, np.nan, torch.float32).to(device)
    exact_BT = _padded([s.exact_S for s in scored], width, False, torch.bool).to(device)
    mapped_BT = _padded(
        [1.0 - s.tail_mass_S - s.unresolved_mass_S for s in scored], width, np.nan, torch.float32
    ).to(device)
    mask_BT = losses.position_mask(
        valid_BT,
        teacher_logprobs_BT=teacher_BT,
        exact_BT=exact_BT,
        mapped_mass_BT=mapped_BT,
        min_mapped_mass=cfg.min_mapped_mass,
        require_exact=cfg.require_exact,
    )

    def teacher_topk() -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's sparse rows, padded (only the losses that read them pay for this)."""
        ids_BTK = _padded([s.topk_ids_SK for s in scored], width, -1, torch.long)
        lps_BTK = _padded([s.topk_logprobs_SK for s in scored], width, -np.inf, torch.float32)
        return ids_BTK.to(device), lps_BTK.to(device)

    if cfg.loss == "candidate_reverse_kl":
        assert logprobs_BTV is not None
        if rollout.candidate_ids is None or any(s.candidate_logprobs_SC is None for s in scored):
            raise TeacherProtocolError(
                "candidate_reverse_kl needs the teacher's candidate_logprobs: the rollout named "
                "no candidates or the service answered none"
            )
        ids_BTC = _padded(rollout.candidate_ids, width, -1, torch.long).to(device)
        teacher_BTC = _padded(
            [s.candidate_logprobs_SC for s in scored], width, np.nan, torch.float32
        ).to(device)
        unresolved_BTC = _padded(
            [s.candidate_unresolved_SC for s in scored], width, 0.0, torch.float32
        ).to(device)
        if cfg.teacher_support:
            topk_ids_BTK, topk_BTK = teacher_topk()
            ids_BTC, teacher_BTC, unresolved_BTC = losses.with_teacher_support(
                ids_BTC, teacher_BTC, unresolved_BTC,
                topk_ids_BTK[..., : cfg.teacher_support], topk_BTK[..., : cfg.teacher_support],
            )  # fmt: skip
        return losses.candidate_reverse_kl_loss(
            logprobs_BTV,
            ids_BTC,
            teacher_BTC,
            mask_BT,
            teacher_unresolved_BTC=unresolved_BTC,
            **(_sampled_rest(rollout, width, teacher_BT, old_BT) if cfg.rest_divergence else {}),
        )
    if cfg.loss == "reverse_kl":
        baseline_BT = None
        kind = _baseline(cfg)
        if kind == "position":
            assert logprobs_BTV is not None
            baseline_BT = losses.position_baseline(logprobs_BTV.detach(), *teacher_topk(), mask_BT)
        elif kind == "group":
            valid = mask_BT & torch.isfinite(teacher_BT)
            per_token_BT = torch.where(valid, torch.nan_to_num(teacher_BT) - old_BT, 0.0)
            group_B = torch.arange(len(mask_BT), device=device) // cfg.samples_per_prompt
            baseline_BT = losses.group_baseline(per_token_BT, valid, group_B)
            if cfg.discount > 0:
                # The baseline of a discounted return: the same per-token mean, discounted alike.
                baseline_BT = losses.discounted_sum(
                    torch.where(valid, torch.nan_to_num(baseline_BT), 0.0), cfg.discount
                )
        return losses.reverse_kl_advantage_loss(
            logprobs_BT, old_BT, torch.nan_to_num(teacher_BT), mask_BT,
            discount=cfg.discount, clip="ppo", clip_eps=cfg.clip_eps, baseline_BT=baseline_BT,
        )  # fmt: skip
    if cfg.loss == "semantic_prior":
        chunks = max(1, max(len(s.chunk_logprobs_C) for s in scored))
        # -1: padding belongs to no chunk (a real id there would cancel that chunk).
        chunk_ids_BT = _padded([s.chunk_ids_S for s in scored], width, -1, torch.long).to(device)
        chunk_BC = _padded([s.chunk_logprobs_C for s in scored], chunks, np.nan, torch.float32)
        return losses.semantic_prior_loss(
            logprobs_BT, old_BT, chunk_ids_BT, chunk_BC.to(device), mask_BT, clip_eps=cfg.clip_eps
        )
    assert logprobs_BTV is not None
    kind = {"forward_kl": "forward", "sparse_reverse_kl": "reverse", "jsd": "jsd"}[cfg.loss]
    sampled_BT = _padded(
        [np.asarray(c, dtype=np.int64) for c in rollout.completion_ids], width, 0, torch.long
    ).to(device)
    topk_ids_BTK, topk_lps_BTK = teacher_topk()
    return losses.sparse_divergence_loss(
        logprobs_BTV, sampled_BT, topk_ids_BTK, topk_lps_BTK,
        torch.nan_to_num(teacher_BT, nan=-np.inf), mask_BT, kind=kind, beta=cfg.jsd_beta,
    )  # fmt: skip


def _baseline(cfg: TrainConfig) -> str:
    """The ``reverse_kl`` baseline in force (``auto`` resolved)."""
    if cfg.baseline != "auto":
        return cfg.baseline
    return "group" if cfg.samples_per_prompt > 1 else "position"


def _sft_loss(model: Any, rollout: Rollout) -> losses.LossOutput:
    """Negative log-likelihood of teacher-written completions (the SFT baseline)."""
    logprobs_BT, mask_BT, _ = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids)
    count = mask_BT.sum().clamp(min=1)
    loss = -(logprobs_BT * mask_BT).sum() / count
    return losses.LossOutput(
        loss=loss, metrics={"nll": float(loss.detach()), "tokens": float(count)}
    )


# -- checkpoints -----------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a broken checkpoint


# -- the loop --------------------------------------------------------------------------------------


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
    return tokenizer, model.to(cfg.device)


@contextlib.contextmanager
def _metrics_writer(path: Path, keep_below_step: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda record: None
        return
    kept: list[str] = []
    if path.exists():
        # On resume, drop lines of steps that the checkpoint does not include.
        kept = [
            line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_below_step
        ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    board = _tensorboard(path.parent / "tensorboard")
    with path.open("w") as stream:
        for line in kept:
            stream.write(line + "\n")

        def write(record: dict[str, Any]) -> None:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            if board is not None:
                for name, value in _scalars(record):
                    if name != "step":
                        board.add_scalar(name, value, record["step"])
                board.flush()

        try:
            yield write
        finally:
            if board is not None:
                board.close()


def _scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a metrics record, nested records as ``teachers/NAME/sequences``."""
    for name, value in record.items():
        if isinstance(value, Mapping):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, int | float):
            yield prefix + name, value


def _tensorboard(folder: Path) -> Any:
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def main(cfg: TrainConfig, extra_eval: ExtraEval | None = None) -> TrainSummary:
    """Train ``cfg.student`` against the teacher service; return what the run did.

    ``extra_eval(model, tokenizer)``, when given, adds its metrics (a task's accuracy, say) to
    every evaluation, which then runs even without held-out prompts.
    """
    rank, world = _distributed()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    tokenizer, model = _load_student(cfg)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup)
    )
    all_prompts, all_routes = load_routed_prompts(cfg.prompts, cfg.teacher_field, cfg.teachers)
    held_out = cfg.eval_prompts if len(all_prompts) > cfg.eval_prompts else 0
    eval_prompts, train_prompts = all_prompts[:held_out], all_prompts[held_out:]
    eval_routes, train_routes = all_routes[:held_out], all_routes[held_out:]
    # Each rank reads its own slice of every step's prompts: positions interleave by rank.
    stream = PromptStream(train_prompts, cfg.seed)
    router = TeacherRouter(cfg.teachers, cfg.teacher_schedule, cfg.teacher_weights, cfg.seed)
    out_dir = cfg.out_dir
    checkpoint_path = out_dir / CHECKPOINT
    step = 0
    pending_states: list[dict[str, Any]] = []
    totals: dict[str, Any] = {
        "student_tokens": 0, "teacher_tokens": 0, "teacher_flops": 0, "teacher_wait_s": 0.0,
    }  # fmt: skip
    if cfg.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank])
        stream.position = state["data_position"][rank]
        step = state["step"]
        pending_states = state["pending"][rank]
        totals = state["totals"]
    elif cfg.resume:
        raise FileNotFoundError(f"--resume given but {checkpoint_path} does not exist")
    by_teacher: dict[str, dict[str, int]] = totals.setdefault("teachers", {})

    teachers = _Teachers.start(cfg, tokenizer, {r for r in all_routes if r is not None})
    try:
        sampler, close_sampler = _sampler(cfg, tokenizer)
    except BaseException:
        teachers.close()
        raise
    vocab = build_vocab(tokenizer) if cfg.loss == "sft" else None
    started = time.perf_counter()
    last: dict[str, Any] = {}
    pipeline: deque[_Pending] = deque()

    def submit_part(rollout: Rollout, seed: int, name: str, indexes: list[int]) -> Future[Any]:
        client = teachers.clients[name]
        if cfg.loss == "sft":
            # The teacher writes the completions; the student's tokens of them are the rollout.
            # Prompt i of the batch is sampled with seed + i when one teacher takes the batch.
            prompts = [wire_prompt(rollout.prompts[i]) for i in indexes]
            return client.submit_generate(prompts, cfg.max_new_tokens, seed=seed + indexes[0])
        sequences = rollout.score_sequences()
        return client.submit_score([sequences[i] for i in indexes])

    def submit(
        rollout: Rollout, seed: int, routes: Sequence[str], fielded: Sequence[bool]
    ) -> _Pending:
        groups = _groups(routes)
        futures = {name: submit_part(rollout, seed, name, idx) for name, idx in groups.items()}
        return _Pending(rollout, seed, tuple(routes), tuple(fielded), futures)

    def new_rollout() -> _Pending:
        seed = cfg.seed * 1_000_003 + stream.position
        taken = take_routed_batch(stream, router, train_routes, cfg.batch_size, world, rank)
        # Each prompt's samples sit next to each other: a group for the baselines.
        taken = [item for item in taken for _ in range(cfg.samples_per_prompt)]
        prompts = [train_prompts[index] for index, _, _ in taken]
        routes = [teachers.name(route) for _, route, _ in taken]
        fielded = [by_field for _, _, by_field in taken]
        if cfg.loss == "sft":
            return submit(Rollout(prompts, [], [], []), seed, routes, fielded)
        rollout = sampler(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            candidates=cfg.candidates if cfg.loss == "candidate_reverse_kl" else 0,
        )  # fmt: skip
        return submit(rollout, seed, routes, fielded)

    # Rollouts that were in the pipeline when the checkpoint was written: scored again (the
    # teacher is deterministic) by the teachers they were routed to, never sampled again, so
    # no step is lost or repeated.
    for saved in pending_states:
        rollout = Rollout.from_state(saved["rollout"])
        count = len(rollout.prompts)
        # Checkpoints from before named teachers: everything went to the default teacher.
        routes = [teachers.known(n) for n in saved.get("routes", [None] * count)]
        fielded = saved.get("fielded", [False] * count)
        pipeline.append(submit(rollout, saved["seed"], routes, fielded))
    # Held-out prompts that name no teacher are spread over the teachers in turn, whatever the
    # schedule: each teacher's distance to the student is then measured on some of them.
    eval_names = [
        teachers.name(
            r if r is not None or not cfg.teachers else cfg.teachers[i % len(cfg.teachers)]
        )
        for i, r in enumerate(eval_routes)
    ]

    progress = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    try:
        with _metrics_writer(out_dir / METRICS, step, rank == 0) as log:
            while step < cfg.steps:
                step_started = time.perf_counter()
                # Keep the pipeline full: these rollouts are scored while this step trains.
                while len(pipeline) < cfg.pipeline_depth + 1:
                    pipeline.append(new_rollout())
                pending = pipeline.popleft()
                rollout = pending.rollout
                waited = time.perf_counter()
                answer = _answer(pending, submit_part, cfg.teacher_resubmits, totals)
                wait_s = time.perf_counter() - waited
                teacher_tokens = _usage_tokens(answer)
                if cfg.loss == "sft":
                    assert vocab is not None
                    rollout = _teacher_rollout(tokenizer, vocab, rollout.prompts, answer)
                    output = _sft_loss(trained, rollout)
                else:
                    output = _batch_loss(cfg, trained, rollout, list(answer.sequences))
                optimiser.zero_grad(set_to_none=True)
                output.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimiser.step()
                scheduler.step()
                step += 1
                step_s = time.perf_counter() - step_started
                per_teacher = _per_teacher(pending, answer, rollout)
                for name, record in per_teacher.items():
                    kept = by_teacher.setdefault(name, {})
                    for key in _TEACHER_TOTALS:
                        kept[key] = kept.get(key, 0) + int(record[key])
                totals["student_tokens"] += rollout.tokens
                totals["teacher_tokens"] += teacher_tokens
                totals["teacher_flops"] = totals.get("teacher_flops", 0) + _usage_flops(answer)
                totals["teacher_engine_s"] = totals.get("teacher_engine_s", 0.0) + float(
                    answer.usage.get("teacher_engine_s") or 0.0
                )
                totals["teacher_wait_s"] += wait_s
                last = {
                    "step": step,
                    "loss": float(output.loss.detach()),
                    **{k: float(v) for k, v in output.metrics.items()},
                    "grad_norm": float(grad_norm),
                    "lr": float(scheduler.get_last_lr()[0]),
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
                evaluate = step % cfg.eval_every == 0 or step == cfg.steps
                if rank == 0 and evaluate:
                    if eval_prompts:
                        last.update(
                            evaluate_reverse_kl(
                                model,
                                tokenizer,
                                teachers.clients,
                                eval_prompts,
                                cfg.max_new_tokens,
                                cfg.seed,
                                routes=eval_names,
                            )
                        )
                    if extra_eval is not None:
                        last.update(extra_eval(model, tokenizer))
                log(last)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                        wait=f"{last['teacher_wait_fraction']:.0%}",
                    )  # fmt: skip
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    _checkpoint(
                        checkpoint_path, model, optimiser, scheduler, step, stream, pipeline,
                        totals, rank, world,
                    )  # fmt: skip
    finally:
        if progress is not None:
            progress.close()
        for pending in pipeline:
            for future in pending.futures.values():
                future.cancel()
        teachers.close()
        close_sampler()
    return TrainSummary(
        steps=step,
        student_tokens=int(totals["student_tokens"]),
        teacher_tokens=int(totals["teacher_tokens"]),
        teacher_flops=int(totals.get("teacher_flops", 0)),
        teacher_wait_s=float(totals["teacher_wait_s"]),
        elapsed_s=time.perf_counter() - started,
        final_metrics=last,
        metrics_path=out_dir / METRICS,
        checkpoint_path=checkpoint_path,
        teachers={name: dict(values) for name, values in by_teacher.items()},
    )


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


#: The per-teacher counts a run adds up (``TrainSummary.teachers``).
_TEACHER_TOTALS = ("sequences", "by_field", "student_tokens", "teacher_tokens", "teacher_flops")


class _Teachers:
    """One started client per teacher the run uses, by name.

    With no ``--teachers``, the service's default teacher is one of them, under the name the
    service gives it (``DEFAULT_TEACHER`` when it gives none); prompts that name another teacher
    in their row get a client of their own.
    """

    def __init__(self, clients: dict[str, SyncTeacherClient], default: str | None) -> None:
        self.clients = clients
        #: The name of the client of the service's default teacher (None with ``--teachers``).
        self.default = default

    @classmethod
    def start(cls, cfg: TrainConfig, tokenizer: Any, requested: set[str]) -> _Teachers:
        """Start the clients of ``cfg.teachers`` (or the default teacher) and of the teachers
        prompt rows ``requested``; nothing is left open when one fails."""
        clients: dict[str, SyncTeacherClient] = {}

        # The candidate loss reads the teacher's row as wide as its support, or the service's max.
        support = cfg.teacher_support if cfg.loss == "candidate_reverse_kl" else 0

        def started(name: str | None) -> SyncTeacherClient:
            client = SyncTeacherClient(
                TeacherClientConfig(
                    urls=cfg.teacher_urls,
                    api_key=cfg.api_key,
                    top_k=max(cfg.top_k, support),
                    teacher=name,
                    clamp_top_k=support > cfg.top_k,
                ),
                student_tokenizer=tokenizer,
            )
            try:
                client.start()
            except BaseException:
                client.close()
                raise
            return client

        default = None
        try:
            for name in cfg.teachers:
                clients[name] = started(name)
            if not cfg.teachers:
                client = started(None)
                default = client.teacher_name or DEFAULT_TEACHER
                clients[default] = client
            for name in sorted(requested - set(clients)):
                clients[name] = started(name)
        except BaseException:
            for client in clients.values():
                client.close()
            raise
        return cls(clients, default)

    def name(self, route: str | None) -> str:
        """The client name of a route (``None``: the service's default teacher)."""
        if route is None:
            if self.default is None:
                raise AssertionError("a prompt without a teacher in a run with --teachers")
            return self.default
        return route

    def known(self, name: str | None) -> str:
        """The client name of a route saved in a checkpoint; a run without ``--teachers`` sends
        the routes it does not know (a checkpoint from before named teachers) to its default."""
        if name in self.clients:
            return name
        if self.default is not None:
            return self.default
        raise ValueError(
            f"the checkpoint routes prompts to teacher {name!r}, which this run does not use "
            f"(teachers {sorted(self.clients)}): resume with the same --teachers"
        )

    def stats(self) -> dict[str, float]:
        """The clients' counters (``ClientStats.as_dict``) added up."""
        out: dict[str, float] = {}
        for client in self.clients.values():
            for key, value in client.stats.as_dict().items():
                out[key] = out.get(key, 0) + value
        return out

    def close(self) -> None:
        """Close every client."""
        for client in self.clients.values():
            client.close()


def _groups(routes: Sequence[str]) -> dict[str, list[int]]:
    """The batch positions of each teacher's prompts, teachers in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(routes):
        groups.setdefault(name, []).append(index)
    return groups


@dataclass(frozen=True)
class _Pending:
    """A rollout in the pipeline, the teacher of each of its prompts (and whether the prompt's
    row chose it), one teacher call in flight per teacher, and the seed the calls used."""

    rollout: Rollout
    seed: int
    routes: tuple[str, ...]
    fielded: tuple[bool, ...]
    #: By teacher; a call resent after it was lost replaces its entry.
    futures: dict[str, Future[Any]]


@dataclass(frozen=True)
class _Answer:
    """A batch's teacher answers in batch order (``sequences`` from score, ``completions`` from
    generate), their usage added up, and each teacher's own answer in ``parts``."""

    sequences: list[ScoredSequence]
    completions: list[Completion]
    usage: dict[str, float]
    parts: dict[str, ScoreResult | GenerateResult]


def _merge(groups: Mapping[str, list[int]], parts: Mapping[str, Any], count: int) -> _Answer:
    """Each teacher's answer put back at its prompts' batch positions."""
    sequences: list[Any] = [None] * count
    completions: list[Any] = [None] * count
    usage: dict[str, float] = {}
    for name, indexes in groups.items():
        part = parts[name]
        items = part.sequences if isinstance(part, ScoreResult) else part.completions
        target = sequences if isinstance(part, ScoreResult) else completions
        for index, item in zip(indexes, items, strict=True):
            target[index] = item
        for key, value in (part.usage or {}).items():
            usage[key] = usage.get(key, 0) + value
    return _Answer(
        [s for s in sequences if s is not None],
        [c for c in completions if c is not None],
        usage,
        dict(parts),
    )


def _answer(
    pending: _Pending,
    submit_part: Callable[[Rollout, int, str, list[int]], Future[Any]],
    resubmits: int,
    totals: dict[str, Any],
) -> _Answer:
    """The teachers' answers for ``pending``; a call lost with its teacher (killed mid-request,
    restarted) is sent again, since the teacher's answer does not depend on which call gets it.
    Nothing is sampled again, so no step is lost or repeated."""
    groups = _groups(pending.routes)
    parts: dict[str, Any] = {}
    for name, indexes in groups.items():
        for attempt in range(resubmits + 1):
            try:
                parts[name] = pending.futures[name].result()
                break
            except TeacherUnavailableError:
                if attempt == resubmits:
                    raise
                time.sleep(min(30.0, 2.0**attempt))
                totals["resubmits"] = totals.get("resubmits", 0) + 1
                pending.futures[name] = submit_part(pending.rollout, pending.seed, name, indexes)
    return _merge(groups, parts, len(pending.routes))


def _per_teacher(pending: _Pending, answer: _Answer, rollout: Rollout) -> dict[str, dict[str, Any]]:
    """What each teacher did for one step: sequences (``by_field``: routed by their own row),
    the student's tokens, the teacher's tokens and FLOPs, and for scoring the mean teacher
    log-prob and sampled-token reverse KL per student token (finite positions)."""
    out: dict[str, dict[str, Any]] = {}
    for name, indexes in _groups(pending.routes).items():
        part = answer.parts[name]
        record: dict[str, Any] = {
            "sequences": len(indexes),
            "by_field": sum(pending.fielded[i] for i in indexes),
            "student_tokens": sum(len(rollout.completion_ids[i]) for i in indexes),
            "teacher_tokens": _usage_tokens(part),
            "teacher_flops": _usage_flops(part),
        }
        if isinstance(part, ScoreResult):
            teacher_sum, gap, positions = 0.0, 0.0, 0
            for index, scored in zip(indexes, part.sequences, strict=True):
                finite = np.isfinite(scored.logprobs_S)
                teacher_sum += float(scored.logprobs_S[finite].sum())
                gap += float(
                    (rollout.old_logprobs[index][finite] - scored.logprobs_S[finite]).sum()
                )
                positions += int(finite.sum())
            if positions:
                record["teacher_logprob_per_token"] = teacher_sum / positions
                record["reverse_kl_per_token"] = gap / positions
        out[name] = record
    return out


def _gather(value: Any, world: int) -> list[Any]:
    """``value`` of every rank, in rank order (every rank must call this)."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _checkpoint(
    path: Path, model: Any, optimiser: Any, scheduler: Any, step: int, stream: PromptStream,
    pipeline: deque[_Pending], totals: dict[str, Any], rank: int, world: int,
) -> None:  # fmt: skip
    """Write the checkpoint (rank 0), with every rank's RNG, data position and pipeline."""
    pending = [
        {
            "rollout": p.rollout.to_state(),
            "seed": p.seed,
            "routes": list(p.routes),
            "fielded": list(p.fielded),
        }
        for p in pipeline
    ]
    per_rank = _gather(
        {"rng": _rng_state(), "position": stream.position, "pending": pending}, world
    )
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(
        path,
        {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": [r["rng"] for r in per_rank],
            "data_position": [r["position"] for r in per_rank],
            "pending": [r["pending"] for r in per_rank],
            "step": step,
            "totals": dict(totals),
            "format": 1,
        },
    )


def _usage_tokens(answer: Any) -> int:
    usage = getattr(answer, "usage", None) or {}
    return int(usage.get("teacher_prompt_tokens", 0)) + int(
        usage.get("teacher_completion_tokens", 0)
    )


def _usage_flops(answer: Any) -> int:
    """Teacher FLOPs the service reports for a call (0 when its engine has no FLOP model)."""
    usage = getattr(answer, "usage", None) or {}
    return int(usage.get("teacher_flops") or 0)


def _teacher_rollout(tokenizer: Any, vocab: Vocab, prompts: list[Prompt], answer: Any) -> Rollout:
    """The teacher's completions in the student's tokens, each spelling exactly the teacher's
    text after the prompt (a plain ``encode`` would add SentencePiece's dummy space, which the
    student would then learn to write), closed by end-of-sequence when the teacher stopped."""
    prompt_ids = [render_student_prompt(tokenizer, p) for p in prompts]
    completions = []
    for item in answer.completions:
        try:
            ids = encode_continuation(tokenizer, vocab, item.text)
        except AlignmentError:  # text this tokenizer cannot spell byte for byte: its best try
            ids = tokenizer.encode(item.text, add_special_tokens=False)
        if item.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        completions.append(ids or [tokenizer.eos_token_id])
    return Rollout(list(prompts), prompt_ids, completions, [np.zeros(len(c)) for c in completions])


def ratio_standard_error(pairs: Sequence[tuple[float, float]]) -> float:
    """Standard error of ``Σ x / Σ y`` over independent samples ``(x_i, y_i)`` (the delta
    method: ``sqrt(Σ (x_i − R y_i)² / (n (n − 1))) / mean(y)``); NaN with fewer than two."""
    if len(pairs) < 2:
        return float("nan")
    xs = np.asarray([x for x, _ in pairs], dtype=np.float64)
    ys = np.asarray([y for _, y in pairs], dtype=np.float64)
    if ys.sum() <= 0:
        return float("nan")
    ratio = xs.sum() / ys.sum()
    n = len(pairs)
    return float(np.sqrt(((xs - ratio * ys) ** 2).sum() / (n * (n - 1))) / ys.mean())


@torch.no_grad()
def evaluate_reverse_kl(
    model: Any,
    tokenizer: Any,
    teacher: SyncTeacherClient | Mapping[str, SyncTeacherClient],
    prompts: list[Prompt],
    max_new_tokens: int,
    seed: int,
    routes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Reverse KL to the teacher per token and per byte on held-out ``prompts``: the student's
    own samples (seeded, temperature 1), scored by the teacher. The caller's random state is
    left as it was, so evaluating never shifts a training run's randomness.

    ``teacher`` may be several clients by name, with ``routes`` naming each prompt's teacher:
    the totals then cover every prompt against its own teacher (``eval_reverse_kl_per_byte_se``:
    the standard error of the per-byte figure over the sampled sequences), and when more than one
    teacher took part each adds ``eval_reverse_kl_per_token@NAME`` and
    ``eval_reverse_kl_per_byte@NAME``.
    """
    clients = dict(teacher) if isinstance(teacher, Mapping) else {"": teacher}
    if routes is None:
        if len(clients) != 1:
            raise ValueError("routes must name each prompt's teacher when several are given")
        routes = [next(iter(clients))] * len(prompts)
    if len(routes) != len(prompts) or not set(routes) <= set(clients):
        raise ValueError(
            f"routes must name one of the teachers {sorted(clients)} for each of the "
            f"{len(prompts)} prompts; got {list(routes)}"
        )
    state = _rng_state()
    try:
        rollout = sample(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
            generator_seed=seed + 12345,
        )  # fmt: skip
    finally:
        _set_rng_state(state)
    sequences = rollout.score_sequences()
    groups = _groups(routes)
    # Every teacher's share is in flight at once; each is then read in turn.
    futures = {
        name: clients[name].submit_score([sequences[i] for i in indexes])
        for name, indexes in groups.items()
    }
    out: dict[str, float] = {}
    gap, tokens, total_bytes = 0.0, 0, 0
    per_sequence: list[tuple[float, int]] = []
    for name, indexes in groups.items():
        answer = futures[name].result()
        part_gap, part_tokens, part_bytes = 0.0, 0, 0
        for index, scored in zip(indexes, answer.sequences, strict=True):
            old = rollout.old_logprobs[index]
            finite = np.isfinite(scored.logprobs_S)
            sequence_gap = float((old[finite] - scored.logprobs_S[finite]).sum())
            sequence_bytes = int(scored.alignment.get("total_bytes", 0))
            per_sequence.append((sequence_gap, sequence_bytes))
            part_gap += sequence_gap
            part_tokens += int(finite.sum())
            part_bytes += sequence_bytes
        gap, tokens, total_bytes = gap + part_gap, tokens + part_tokens, total_bytes + part_bytes
        if len(groups) > 1:
            out[f"eval_reverse_kl_per_token@{name}"] = part_gap / max(1, part_tokens)
            out[f"eval_reverse_kl_per_byte@{name}"] = part_gap / max(1, part_bytes)
    return {
        "eval_reverse_kl_per_token": gap / max(1, tokens),
        "eval_reverse_kl_per_byte": gap / max(1, total_bytes),
        "eval_reverse_kl_per_byte_se": ratio_standard_error(per_sequence),
        "eval_student_logprob_per_token": float(
            sum(o.sum() for o in rollout.old_logprobs) / max(1, rollout.tokens)
        ),
        **out,
    }
