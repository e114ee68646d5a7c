"""Several teachers behind one run: a started client per teacher, each step's batch split by
teacher and sent as one call each, the answers merged back in batch order (a call lost with its
teacher sent again), and what each teacher did per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.errors import TeacherUnavailableError
from tokenbridge.client.rollout import (
    Rollout,
)
from tokenbridge.client.teacher import (
    Completion,
    GenerateResult,
    ScoreResult,
    SyncTeacherClient,
    TeacherClientConfig,
)
from tokenbridge.shared.protocol import DEFAULT_TEACHER, ScoredSequence

TEACHER_TOTALS = ("sequences", "by_field", "student_tokens", "teacher_tokens", "teacher_flops")


class Teachers:
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
    def start(cls, cfg: TrainConfig, tokenizer: Any, requested: set[str]) -> Teachers:
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


def groups_of(routes: Sequence[str]) -> dict[str, list[int]]:
    """The batch positions of each teacher's prompts, teachers in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(routes):
        groups.setdefault(name, []).append(index)
    return groups


@dataclass(frozen=True)
class Pending:
    """A rollout in the pipeline, the teacher of each of its prompts (and whether the prompt's
    row chose it), one teacher call in flight per teacher, and the seed the calls used."""

    rollout: Rollout
    seed: int
    routes: tuple[str, ...]
    fielded: tuple[bool, ...]
    #: By teacher; a call resent after it was lost replaces its entry.
    futures: dict[str, Future[Any]]


@dataclass(frozen=True)
class Answer:
    """A batch's teacher answers in batch order (``sequences`` from score, ``completions`` from
    generate), their usage added up, and each teacher's own answer in ``parts``."""

    sequences: list[ScoredSequence]
    completions: list[Completion]
    usage: dict[str, float]
    parts: dict[str, ScoreResult | GenerateResult]


def merge_answers(groups: Mapping[str, list[int]], parts: Mapping[str, Any], count: int) -> Answer:
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
    return Answer(
        [s for s in sequences if s is not None],
        [c for c in completions if c is not None],
        usage,
        dict(parts),
    )


def await_answer(
    pending: Pending,
    submit_part: Callable[[Rollout, int, str, list[int]], Future[Any]],
    resubmits: int,
    totals: dict[str, Any],
) -> Answer:
    """The teachers' answers for ``pending``; a call lost with its teacher (killed mid-request,
    restarted) is sent again, since the teacher's answer does not depend on which call gets it.
    Nothing is sampled again, so no step is lost or repeated."""
    groups = groups_of(pending.routes)
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
    return merge_answers(groups, parts, len(pending.routes))


def per_teacher_counts(
    pending: Pending, answer: Answer, rollout: Rollout
) -> dict[str, dict[str, Any]]:
    """What each teacher did for one step: sequences (``by_field``: routed by their own row),
    the student's tokens, the teacher's tokens and FLOPs, and for scoring the mean teacher
    log-prob and sampled-token reverse KL per student token (finite positions)."""
    out: dict[str, dict[str, Any]] = {}
    for name, indexes in groups_of(pending.routes).items():
        part = answer.parts[name]
        record: dict[str, Any] = {
            "sequences": len(indexes),
            "by_field": sum(pending.fielded[i] for i in indexes),
            "student_tokens": sum(len(rollout.completion_ids[i]) for i in indexes),
            "teacher_tokens": usage_tokens(part),
            "teacher_flops": usage_flops(part),
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


def usage_tokens(answer: Any) -> int:
    usage = getattr(answer, "usage", None) or {}
    return int(usage.get("teacher_prompt_tokens", 0)) + int(
        usage.get("teacher_completion_tokens", 0)
    )


def usage_flops(answer: Any) -> int:
    """Teacher FLOPs the service reports for a call (0 when its engine has no FLOP model)."""
    usage = getattr(answer, "usage", None) or {}
    return int(usage.get("teacher_flops") or 0)
