"""The student's on-policy trainer: ``main(cfg)`` reads top to bottom.

eval → rollout → score (asynchronously, ``pipeline_depth`` rollouts ahead, so teacher scoring
overlaps sampling and the optimiser step; staleness = depth, reported) → loss → optimiser step →
log → checkpoint. Checkpoints hold the model, optimiser, scheduler, every RNG, the data position
and the rollouts still in the pipeline, so ``resume`` continues exactly where the run stopped.
Under ``torchrun`` each rank samples its own prompts and calls the teacher itself; gradients are
averaged by DDP; rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenbridge.client import losses
from tokenbridge.client.config import TrainConfig
from tokenbridge.client.errors import TeacherUnavailableError
from tokenbridge.client.rollout import (
    Prompt,
    Rollout,
    completion_logprobs,
    render_student_prompt,
    sample,
    wire_prompt,
)
from tokenbridge.client.teacher import SyncTeacherClient, TeacherClientConfig
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.errors import AlignmentError
from tokenbridge.shared.protocol import ScoredSequence
from tokenbridge.shared.vocab import Vocab, build_vocab

#: An evaluation of the student beyond the built-in one: ``(model, tokenizer) -> metrics``.
ExtraEval = Callable[[Any, Any], dict[str, float]]

__all__ = [
    "ExtraEval",
    "PromptStream",
    "TrainSummary",
    "evaluate_reverse_kl",
    "load_prompts",
    "main",
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
    small built-in set of Shakespeare openings when no file is given."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts: list[Prompt] = []
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
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


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
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[index]])
            self.position += 1
        return out


# -- one step's loss -------------------------------------------------------------------------------


def _padded(values: list[np.ndarray], width: int, fill: float, dtype: Any) -> torch.Tensor:
    out = np.full((len(values), width, *values[0].shape[1:]) if values else (0, width), fill)
    for b, row in enumerate(values):
        out[b, : len(row)] = row
    return torch.as_tensor(out, dtype=dtype)


def _batch_loss(
    cfg: TrainConfig, model: Any, rollout: Rollout, scored: list[ScoredSequence]
) -> losses.LossOutput:
    """The configured loss of one scored rollout, with gradients into ``model``."""
    sparse = cfg.loss in ("forward_kl", "sparse_reverse_kl", "jsd")
    logprobs_BT, valid_BT, logprobs_BTV = completion_logprobs(
        model, rollout.prompt_ids, rollout.completion_ids, full=sparse
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
    if cfg.loss == "reverse_kl":
        return losses.reverse_kl_advantage_loss(
            logprobs_BT, old_BT, torch.nan_to_num(teacher_BT), mask_BT,
            discount=cfg.discount, clip="ppo", clip_eps=cfg.clip_eps,
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
    topk_ids_BTK = _padded([s.topk_ids_SK for s in scored], width, -1, torch.long).to(device)
    topk_lps_BTK = _padded([s.topk_logprobs_SK for s in scored], width, -np.inf, torch.float32)
    return losses.sparse_divergence_loss(
        logprobs_BTV, sampled_BT, topk_ids_BTK, topk_lps_BTK.to(device),
        torch.nan_to_num(teacher_BT, nan=-np.inf), mask_BT, kind=kind, beta=cfg.jsd_beta,
    )  # fmt: skip


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
    """What a run did: steps, tokens, time waiting on the teacher, final metrics, files."""

    steps: int
    student_tokens: int
    teacher_tokens: int
    teacher_flops: int
    teacher_wait_s: float
    elapsed_s: float
    final_metrics: dict[str, float]
    metrics_path: Path
    checkpoint_path: Path


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
                for name, value in record.items():
                    if name != "step" and isinstance(value, int | float):
                        board.add_scalar(name, value, record["step"])
                board.flush()

        try:
            yield write
        finally:
            if board is not None:
                board.close()


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
    all_prompts = load_prompts(cfg.prompts)
    eval_prompts = all_prompts[: cfg.eval_prompts] if len(all_prompts) > cfg.eval_prompts else []
    train_prompts = all_prompts[len(eval_prompts) :]
    # Each rank reads its own slice of every step's prompts: positions interleave by rank.
    stream = PromptStream(train_prompts, cfg.seed)
    out_dir = cfg.out_dir
    checkpoint_path = out_dir / CHECKPOINT
    step = 0
    pending_states: list[dict[str, Any]] = []
    totals = {"student_tokens": 0, "teacher_tokens": 0, "teacher_flops": 0, "teacher_wait_s": 0.0}
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

    teacher = SyncTeacherClient(
        TeacherClientConfig(urls=cfg.teacher_urls, api_key=cfg.api_key, top_k=cfg.top_k),
        student_tokenizer=tokenizer,
    )
    try:
        teacher.start()
    except BaseException:
        teacher.close()
        raise
    sampler, close_sampler = _sampler(cfg, tokenizer)
    vocab = build_vocab(tokenizer) if cfg.loss == "sft" else None
    started = time.perf_counter()
    last: dict[str, float] = {}
    pipeline: deque[_Pending] = deque()

    def submit(rollout: Rollout, seed: int) -> _Pending:
        if cfg.loss == "sft":
            # The teacher writes the completions; the student's tokens of them are the rollout.
            prompts = [wire_prompt(p) for p in rollout.prompts]
            return _Pending(
                rollout, teacher.submit_generate(prompts, cfg.max_new_tokens, seed=seed), seed
            )
        return _Pending(rollout, teacher.submit_score(rollout.score_sequences()), seed)

    def new_rollout() -> _Pending:
        seed = cfg.seed * 1_000_003 + stream.position
        prompts = stream.take(cfg.batch_size * world)[rank::world]
        if cfg.loss == "sft":
            return submit(Rollout(prompts, [], [], []), seed)
        rollout = sampler(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
        )  # fmt: skip
        return submit(rollout, seed)

    # Rollouts that were in the pipeline when the checkpoint was written: scored again (the
    # teacher is deterministic), never sampled again, so no step is lost or repeated.
    for saved in pending_states:
        pipeline.append(submit(Rollout.from_state(saved["rollout"]), saved["seed"]))

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
                answer = _answer(pending, submit, cfg.teacher_resubmits, totals)
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
                totals["student_tokens"] += rollout.tokens
                totals["teacher_tokens"] += teacher_tokens
                totals["teacher_flops"] = totals.get("teacher_flops", 0) + _usage_flops(answer)
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
                    "teacher_resubmits_total": totals.get("resubmits", 0),
                    **{
                        f"teacher_{name}_total": float(value)
                        for name, value in teacher.stats.as_dict().items()
                        if name in ("retries", "failovers", "reregistrations")
                    },
                }
                evaluate = step % cfg.eval_every == 0 or step == cfg.steps
                if rank == 0 and evaluate:
                    if eval_prompts:
                        last.update(
                            evaluate_reverse_kl(
                                model,
                                tokenizer,
                                teacher,
                                eval_prompts,
                                cfg.max_new_tokens,
                                cfg.seed,
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
            pending.future.cancel()
        teacher.close()
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


@dataclass(frozen=True)
class _Pending:
    """A rollout in the pipeline, its teacher call in flight, and the seed that call used."""

    rollout: Rollout
    future: Future[Any]
    seed: int


def _answer(pending: _Pending, submit: Any, resubmits: int, totals: dict[str, Any]) -> Any:
    """The teacher's answer for ``pending``; a call lost with the teacher (killed mid-request,
    restarted) is sent again, since the teacher's answer does not depend on which call gets it.
    Nothing is sampled again, so no step is lost or repeated."""
    for attempt in range(resubmits + 1):
        try:
            return pending.future.result()
        except TeacherUnavailableError:
            if attempt == resubmits:
                raise
            time.sleep(min(30.0, 2.0**attempt))
            totals["resubmits"] = totals.get("resubmits", 0) + 1
            pending = submit(pending.rollout, pending.seed)
    raise AssertionError("unreachable")


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
    pending = [{"rollout": p.rollout.to_state(), "seed": p.seed} for p in pipeline]
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


@torch.no_grad()
def evaluate_reverse_kl(
    model: Any,
    tokenizer: Any,
    teacher: SyncTeacherClient,
    prompts: list[Prompt],
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """Reverse KL to the teacher per token and per byte on held-out ``prompts``: the student's
    own samples (seeded, temperature 1), scored by the teacher. The caller's random state is
    left as it was, so evaluating never shifts a training run's randomness."""
    state = _rng_state()
    try:
        rollout = sample(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
            generator_seed=seed + 12345,
        )  # fmt: skip
    finally:
        _set_rng_state(state)
    answer = teacher.score(rollout.score_sequences())
    gap, tokens, total_bytes = 0.0, 0, 0
    for old, scored in zip(rollout.old_logprobs, answer.sequences, strict=True):
        finite = np.isfinite(scored.logprobs_S)
        gap += float((old[finite] - scored.logprobs_S[finite]).sum())
        tokens += int(finite.sum())
        total_bytes += int(scored.alignment.get("total_bytes", 0))
    return {
        "eval_reverse_kl_per_token": gap / max(1, tokens),
        "eval_reverse_kl_per_byte": gap / max(1, total_bytes),
        "eval_student_logprob_per_token": float(
            sum(o.sum() for o in rollout.old_logprobs) / max(1, rollout.tokens)
        ),
    }
