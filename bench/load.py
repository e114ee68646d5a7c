"""Load benchmark: concurrent students of different tokenizer families against one teacher service.

Setup: ``tokenbridge serve`` as its own process on loopback (127.0.0.1 only) with a tiny
GPT-2-architecture teacher (hidden 256, 4 layers, the real GPT-2 tokenizer, built locally: nothing
is downloaded). ``--students`` simulated students run as asyncio tasks, each with its own
``httpx.AsyncClient`` and its own offline tokenizer, cycling through the families (mistral-v1,
qwen2, llama3, gpt2, mistral-v3, tekken, qwen3.6). Each student registers its tokenizer
(``POST /v1/tokenizers``), waits for the others, then loops until ``--duration`` seconds have passed
or it has sent ``--max-requests`` requests: a msgpack ``POST /v1/score`` of ``--batch`` completions
of a Shakespeare play (a text prompt, 32-64 student tokens encoded in its own tokenizer, as a
continuation), ``top_k`` 16, validated row by row. 429 and 503 are retried as ``TeacherClient``
retries them: never sooner than ``Retry-After``, full-jitter exponential backoff (``--backoff-*``),
at most ``--max-retries`` times. A request in flight when the time is up is finished, not
abandoned. Admission refuses rather than queues, so under sustained overload a refused student can
keep losing its turn to students whose answers just came back (they send again at once):
``per_student`` shows the spread, ``retries_exhausted`` what a ``TeacherClient`` would give up on.

Accounting is per logical request (a request and its retries count once):

* ``requests``: requests sent; ``answered``: answered 200 with a valid answer;
  ``refused_retried``: answered after one or more 429/503 refusals;
* ``attempts``: HTTP exchanges, retries included; ``statuses``: every attempt by HTTP status;
  ``refusals``: the 429/503 attempts by status;
* ``lost``: requests neither answered nor refused-then-answered, with their reasons in ``errors``
  (an HTTP status other than 200/429/503, an exception or timeout, an answer that fails
  validation, retries exhausted, cancelled at the hard stop). It must be 0;
* ``server_errors``: attempts answered 5xx other than 503 (a 503 is a refusal, retried);
* ``server``: the service's own ``/metrics`` counts for ``/v1/score`` by status, which must match
  ``statuses`` (``accounting_matches``).

Latencies (ms, answered requests only): ``latency_ms`` end to end, refusal waits included;
``attempt_latency_ms`` the answered attempt alone; ``refusal_latency_ms`` how long a refusal took to
come back; ``retry_after_s`` the waits the service asked for; ``service_stage_s`` the service's own
``timings`` per request. Rates (``positions_per_s``, ``teacher_tokens_per_s``, from each answer's
``usage``) are over the load phase's wall time ``duration_s``: from the last registration to the
last answer (the requests in flight at ``requested_duration_s`` included; registration is
reported apart).

Run ``python bench/load.py --students 8 --duration 60``; ``--max-tokens-in-flight 1000`` (about one
request of the default shape at a time) provokes admission refusals. The last line of stdout is one
JSON object, progress goes to stderr. The exit status is 1 if a request was lost or an attempt was
answered 5xx (other than 503).

Several teachers (``--teachers N``, default 1: one teacher, as above). One ``tokenbridge serve``
hosts N teachers named ``t0`` .. ``t{N-1}``, each a tiny model of another tokenizer family
(``TEACHER_MODELS``: GPT-2 architecture over the GPT-2 tokenizer, then Llama architecture over the
Llama 3, Qwen 2, Mistral v1, ... tokenizers; ``--hidden``/``--layers`` shape them all; nothing is
downloaded). ``--teacher PATH``, repeated, gives teacher i the i-th path instead. Students are
assigned to teachers round robin, or ``--teacher-students 7,1`` (7 students on ``t0``, 1 on
``t1``; ``--students`` is then their sum). Every request names its student's teacher
(``"teacher": "t0"``) and the answer's ``teacher.name`` must be that one (a bad answer otherwise).
Each teacher's admission is its own: ``--teacher-max-tokens-in-flight 1000,262144``,
``--teacher-admission-wait-s 0,5`` and ``--teacher-admission-queue 16,256`` give one value per
teacher (an empty entry, as in ``1000,``, keeps the service-wide flag's value), passed to ``serve``
as ``--teacher-options tI.KEY=VALUE``; ``--teacher-options`` passes any other ``tI.KEY=VALUE``
through. The result then has ``teachers``: per teacher its model and limits (``/v1/info``), its
``students``, the same counts, refusals, latencies and rates as the totals (over the same
``duration_s``), and ``server``: that teacher's ``/metrics`` (``/v1/score`` requests by status,
``rejected`` by admission, ``scored_positions``, ``teacher_tokens``); ``accounting_matches`` then
also requires every teacher's statuses to match its own ``tokenbridge_requests_total``.

``--teachers 2 --teacher-students 7,1 --teacher-max-tokens-in-flight 1000,262144`` measures that a
busy teacher cannot starve another: ``t0``'s seven students wait in ``t0``'s own admission line
(``service_stage_s.engine_s`` includes that wait), and with ``--teacher-admission-wait-s 0,5``
(no line at ``t0``) ``t0`` refuses them (429, its own limit); ``t1``'s student neither waits nor is
refused. Both teachers' engines share the machine's cores, so ``t1``'s latency still grows with
``t0``'s compute: what is isolated is admission (refusals and the line), not compute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokenbridge.corpus import shakespeare_dir
from tokenbridge.hub import load_tokenizer
from tokenbridge.process import serve_process
from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.codec import MSGPACK, pack, unpack
from tokenbridge.shared.protocol import ScoredSequence, retry_after_seconds
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: Tokenizer families, SentencePiece and byte-level alternating, cycled over the students.
FAMILIES = ("mistral-v1", "qwen2", "llama3", "gpt2", "mistral-v3", "tekken", "qwen3.6")
TOP_K = 16
HEADERS = {"content-type": MSGPACK, "accept": MSGPACK}
TARGETS = {"lost_max": 0, "server_errors_max": 0}
#: The tiny teachers of ``--teachers N`` (architecture, tokenizer family), one family each.
TEACHER_MODELS = (
    ("gpt2", "gpt2"), ("llama", "llama3"), ("llama", "qwen2"), ("llama", "mistral-v1"),
    ("llama", "tekken"), ("llama", "mistral-v3"), ("llama", "qwen3.6"),
)  # fmt: skip
#: The name ``serve`` gives a teacher passed without one (``--teacher PATH``).
SINGLE_TEACHER = "default"
#: Per-teacher admission flags: ``--teacher-KEY`` (comma list) -> ``serve``'s ``tI.KEY=VALUE``.
TEACHER_LIMITS = {
    "max_tokens_in_flight": (int, "1000,262144"), "admission_wait_s": (float, "0,5"),
    "admission_queue": (int, "16,256"),
}  # fmt: skip


# -- the students' work ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Student:
    """One simulated student: its tokenizer and a pool of completions to score."""

    index: int
    family: str
    play: str
    vocab_size: int
    sequences: list[dict[str, Any]]
    #: The teacher it asks (by name) and whose name its answers must carry; ``None``: not checked.
    teacher: str | None = None


def _play(index: int) -> tuple[str, str]:
    """The body of the ``index``-th play (modern spelling), without Gutenberg's front and back."""
    plays = sorted(shakespeare_dir().glob("*_gut.txt"))
    path = plays[index % len(plays)]
    text = path.read_text(encoding="utf-8", errors="replace")
    return path.stem, text[len(text) // 20 : len(text) * 9 // 10]


def _completions(
    tokenizer: Any, vocab: Any, text: str, count: int, rng: random.Random, tokens: tuple[int, int]
) -> list[dict[str, Any]]:
    """``count`` sequences from ``text``: a prompt of a few lines, then a completion of
    ``tokens[0]..tokens[1]`` student tokens that continues it (as a student's sample would)."""
    out: list[dict[str, Any]] = []
    low, high = tokens
    while len(out) < count:
        start = text.find("\n", rng.randrange(500, len(text) - 8 * high)) + 1
        prompt_from = text.rfind("\n", 0, start - rng.randrange(80, 400)) + 1
        want = rng.randint(low, high)
        ids = encode_continuation(tokenizer, vocab, text[start : start + 8 * high])[:want]
        if len(ids) < low:
            continue
        out.append(
            {
                "prompt": {"text": text[prompt_from:start]},
                "completion_ids": np.asarray(ids, dtype=np.int64),
            }
        )
    return out


def _students(args: argparse.Namespace) -> list[Student]:
    """The students, their tokenizers loaded offline and their sequences encoded up front (the
    load phase then spends the client's CPU on HTTP and validation only)."""
    tables = TableCache(args.cache_dir / "tables")
    loaded: dict[str, tuple[Any, Any]] = {}
    students = []
    for index in range(args.students):
        family = args.tokenizers[index % len(args.tokenizers)]
        if family not in loaded:
            tokenizer = load_tokenizer(family, args.cache_dir)
            loaded[family] = (tokenizer, tables.vocab(tokenizer, family))
        tokenizer, vocab = loaded[family]
        play, text = _play(index)
        rng = random.Random(args.seed * 1000 + index)
        pool = _completions(
            tokenizer, vocab, text, args.pool, rng, (args.min_tokens, args.max_tokens)
        )
        teacher = args.teacher_names[args.student_teachers[index]]
        students.append(Student(index, family, play, len(tokenizer), pool, teacher))
    return students


@dataclass(frozen=True)
class Retries:
    """How 429/503 are retried; the defaults are ``TeacherClientConfig``'s."""

    max_retries: int = 8
    backoff_base_s: float = 0.25
    backoff_max_s: float = 30.0

    def wait_s(self, refusal: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after the ``refusal``-th refusal: full-jitter exponential backoff,
        never sooner than the service's ``Retry-After``."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (refusal - 1))
        return max(retry_after or 0.0, rng.uniform(0.0, ceiling))


# -- accounting -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything one student saw. Merged over the students at the end."""

    requests: int = 0
    answered: int = 0
    refused_retried: int = 0
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency_s: list[float] = field(default_factory=list)
    attempt_latency_s: list[float] = field(default_factory=list)
    refusal_latency_s: list[float] = field(default_factory=list)
    retry_wait_s: float = 0.0
    retry_after_s: list[float] = field(default_factory=list)
    #: 429/503 answers without a usable ``Retry-After`` (the protocol promises one).
    missing_retry_after: int = 0
    positions: int = 0
    teacher_tokens: int = 0
    request_teacher_tokens: list[int] = field(default_factory=list)
    sequences: int = 0
    unscored_positions: int = 0
    #: The service's own ``timings`` of answered requests, summed by stage (prepare, engine, ...).
    stage_s: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return sum(self.errors.values())

    @property
    def refusals(self) -> int:
        return self.statuses["429"] + self.statuses["503"]

    def merge(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, name, mine + theirs)


class BadAnswerError(Exception):
    """A 200 whose body does not say what the request asked."""


def _validate(
    answer: Any, body: dict[str, Any], vocab_size: int, teacher: str | None = None
) -> tuple[int, int, int]:
    """Check a score answer against its request, and that ``teacher`` (when given) answered it;
    (positions, teacher tokens, unscored rows)."""
    if not isinstance(answer, dict) or answer.get("top_k") != body["top_k"]:
        raise BadAnswerError("top_k missing or not the one asked")
    if teacher is not None:
        stamp = answer.get("teacher")
        name = stamp.get("name") if isinstance(stamp, dict) else None
        if name != teacher:
            raise BadAnswerError(f"teacher {teacher!r} asked, {name!r} answered")
    sent, got = body["sequences"], answer.get("sequences")
    if not isinstance(got, list) or len(got) != len(sent):
        raise BadAnswerError(f"{len(sent)} sequences sent, {len(got or [])} answered")
    unscored = 0
    for request, wire in zip(sent, got, strict=True):
        rows = len(request["completion_ids"])
        scored = ScoredSequence.from_wire(wire, body["top_k"])
        per_row = (
            scored.logprobs_S, scored.chunk_ids_S, scored.tail_mass_S,
            scored.unresolved_mass_S, scored.exact_S,
        )  # fmt: skip
        if any(a.shape != (rows,) for a in per_row):
            raise BadAnswerError(f"per-token arrays need {rows} rows")
        if scored.topk_ids_SK.shape != (rows, body["top_k"]) or (
            scored.topk_logprobs_SK.shape != scored.topk_ids_SK.shape
        ):
            raise BadAnswerError(f"top-K arrays need shape ({rows}, {body['top_k']})")
        finite = np.isfinite(scored.logprobs_S)
        if (scored.logprobs_S[finite] > 1e-4).any():
            raise BadAnswerError("a log-prob above 0")
        # Gaps (bytes the teacher cannot spell) leave rows unscored; without gaps none may be.
        if scored.alignment.get("untiled_bytes", 0) == 0 and not finite.all():
            raise BadAnswerError("non-finite log-probs in a completion without gaps")
        ids = scored.topk_ids_SK[finite]
        if ((ids < -1) | (ids >= vocab_size)).any():
            raise BadAnswerError("a top-K id outside the student's vocabulary")
        if (ids[:, 0] < 0).any() or not np.isfinite(scored.topk_logprobs_SK[finite][:, 0]).all():
            raise BadAnswerError("a scored row without a most likely token")
        unscored += int((~finite).sum())
    usage = answer.get("usage") or {}
    positions = sum(len(s["completion_ids"]) for s in sent)
    if usage.get("positions") != positions:
        raise BadAnswerError(
            f"usage.positions {usage.get('positions')} for {positions} tokens sent"
        )
    return positions, int(usage.get("teacher_tokens", 0)), unscored


async def _score_once(
    http: httpx.AsyncClient,
    student: Student,
    body: dict[str, Any],
    tally: Tally,
    rng: random.Random,
    retries: Retries,
) -> None:
    """One logical request: send, retry 429/503 like ``TeacherClient``, validate, count."""
    content = pack(body)
    tally.requests += 1
    started = time.perf_counter()
    refused = 0
    while True:
        attempt_started = time.perf_counter()
        tally.attempts += 1
        try:
            response = await http.post("/v1/score", content=content, headers=HEADERS)
        except Exception as error:  # timeouts, broken connections, anything: the request is lost
            tally.errors[f"exception:{type(error).__name__}"] += 1
            return
        attempt_s = time.perf_counter() - attempt_started
        status = response.status_code
        tally.statuses[str(status)] += 1
        if status in (429, 503):
            tally.refusal_latency_s.append(attempt_s)
            refused += 1
            if refused > retries.max_retries:
                tally.errors["retries_exhausted"] += 1
                return
            retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
            tally.missing_retry_after += retry_after is None
            if retry_after is not None:
                tally.retry_after_s.append(retry_after)
            wait = retries.wait_s(refused, retry_after, rng)
            tally.retry_wait_s += wait
            await asyncio.sleep(wait)
            continue
        if status != 200:
            tally.errors[f"http_{status}"] += 1
            return
        try:
            answer = unpack(response.content)
            positions, teacher_tokens, unscored = _validate(
                answer, body, student.vocab_size, student.teacher
            )
        except Exception as error:  # a decoding error or a failed check: a bad answer
            tally.errors[f"bad_answer:{type(error).__name__}"] += 1
            print(
                f"student {student.index} ({student.family}): bad answer: {error}", file=sys.stderr
            )
            return
        tally.answered += 1
        tally.refused_retried += refused > 0
        tally.latency_s.append(time.perf_counter() - started)
        tally.attempt_latency_s.append(attempt_s)
        tally.positions += positions
        tally.teacher_tokens += teacher_tokens
        tally.request_teacher_tokens.append(teacher_tokens)
        tally.sequences += len(body["sequences"])
        tally.unscored_positions += unscored
        tally.stage_s.update(answer.get("timings") or {})
        return


async def _register(http: httpx.AsyncClient, student: Student) -> dict[str, Any]:
    """``POST /v1/tokenizers`` for the student's family; its id, status and time taken."""
    started = time.perf_counter()
    response = await http.post(
        "/v1/tokenizers", content=pack({"name": student.family, "hub": student.family}),
        headers=HEADERS,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"student {student.index} could not register {student.family}: "
            f"{response.status_code} {response.text[:300]}"
        )
    answer = unpack(response.content)
    return {
        "id": answer["id"],
        "status": response.status_code,
        "ms": round(elapsed * 1000, 1),
        "vocab_overlap": answer.get("vocab_overlap"),
        "probe_one_to_one_share": answer.get("probe_one_to_one_share"),
    }


async def _run_student(
    http: httpx.AsyncClient,
    student: Student,
    student_id: str,
    args: argparse.Namespace,
    deadline: float,
    tally: Tally,
) -> None:
    """Score until the deadline or the request cap; the request in flight is finished."""
    rng = random.Random(args.seed * 7919 + student.index)
    cursor = rng.randrange(len(student.sequences))
    while time.perf_counter() < deadline and tally.requests < args.max_requests:
        batch = [
            student.sequences[(cursor + i) % len(student.sequences)] for i in range(args.batch)
        ]
        cursor += args.batch
        body = {"student_tokenizer": student_id, "top_k": args.top_k, "sequences": batch}
        if args.teachers > 1:  # one teacher: its requests name none, as before
            body["teacher"] = student.teacher
        await _score_once(http, student, body, tally, rng, args.retries)


def _by_teacher(students: list[Student], tallies: list[Tally]) -> dict[str, Tally]:
    """The students' tallies merged per teacher, in the order the teachers first appear."""
    merged: dict[str, Tally] = {}
    for student, tally in zip(students, tallies, strict=True):
        merged.setdefault(student.teacher or "", Tally()).merge(tally)
    return merged


async def _progress(
    students: list[Student], tallies: list[Tally], started: float, every: float
) -> None:
    while True:
        await asyncio.sleep(every)
        groups = _by_teacher(students, tallies)
        total = Tally()
        for tally in groups.values():
            total.merge(tally)
        line = (
            f"[{time.perf_counter() - started:6.1f} s] requests {total.requests} "
            f"answered {total.answered} refusals {total.refusals} lost {total.lost}"
        )
        if len(groups) > 1:
            line += "; " + ", ".join(
                f"{name}: {t.answered} answered, {t.refusals} refused" for name, t in groups.items()
            )
        print(line, file=sys.stderr)


async def _drive(
    url: str, students: list[Student], args: argparse.Namespace
) -> tuple[list[Tally], list[dict[str, Any]], float, float]:
    """Register every student, then run them all; (tallies, registrations, registration wall s,
    load wall s)."""
    timeout = httpx.Timeout(args.timeout, connect=5.0)
    tallies = [Tally() for _ in students]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=timeout))
            for _ in students
        ]
        started = time.perf_counter()
        registrations = await asyncio.wait_for(
            asyncio.gather(*(_register(h, s) for h, s in zip(clients, students, strict=True))),
            args.registration_timeout,
        )
        registered = time.perf_counter()
        print(f"registered {len(students)} students; load for {args.duration:g} s", file=sys.stderr)
        deadline = registered + args.duration
        tasks = [
            asyncio.create_task(_run_student(h, s, r["id"], args, deadline, t))
            for h, s, r, t in zip(clients, students, registrations, tallies, strict=True)
        ]
        progress = asyncio.create_task(
            _progress(students, tallies, registered, args.progress_every)
        )
        # The hard stop: the duration, then time for the requests in flight to finish.
        per_attempt = args.timeout + max(args.retries.backoff_max_s, args.request_timeout_s)
        hard_stop = args.duration + (args.retries.max_retries + 1) * per_attempt + 30
        _, pending = await asyncio.wait(tasks, timeout=hard_stop)
        finished = time.perf_counter()
        for task in [*pending, progress]:
            task.cancel()
        await asyncio.gather(*pending, progress, return_exceptions=True)
        for task, tally in zip(tasks, tallies, strict=True):
            if task in pending:
                tally.errors["cancelled_at_hard_stop"] += (
                    tally.requests - tally.answered - tally.lost
                )
            elif task.exception() is not None:
                raise RuntimeError("a student failed outside its requests") from task.exception()
    return tallies, registrations, registered - started, finished - registered


# -- the service --------------------------------------------------------------------------------


@dataclass
class ServerCounts:
    """What the service's ``/metrics`` counted: ``/v1/score`` requests by status, over every
    teacher (``total``) and by the teacher they named (``teachers``, with that teacher's
    ``rejected``, ``scored_positions`` and ``teacher_tokens``)."""

    total: dict[str, int] = field(default_factory=dict)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def teacher(self, name: str) -> dict[str, Any]:
        return self.teachers.setdefault(
            name,
            {
                "score_requests_by_status": {},
                "rejected": 0,
                "scored_positions": 0,
                "teacher_tokens": 0,
            },
        )


def _server_counts(url: str) -> ServerCounts:
    """The service's counts, from its ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    counts = ServerCounts()
    sums = {
        "tokenbridge_rejected_total": "rejected",
        "tokenbridge_scored_positions_total": "scored_positions",
        "tokenbridge_teacher_tokens_total": "teacher_tokens",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            if sample.name == "tokenbridge_requests_total" and labels.get("route") == "/v1/score":
                status = labels["status"]
                counts.total[status] = counts.total.get(status, 0) + value
                if labels.get("teacher"):  # "": refused before it named a teacher
                    by_status = counts.teacher(labels["teacher"])["score_requests_by_status"]
                    by_status[status] = by_status.get(status, 0) + value
            elif sample.name in sums and labels.get("teacher"):
                counts.teacher(labels["teacher"])[sums[sample.name]] += value
    for entry in counts.teachers.values():
        entry["score_requests_by_status"] = dict(sorted(entry["score_requests_by_status"].items()))
    return counts


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ms = np.asarray(seconds) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(ms.max()), 1),
        "mean": round(float(ms.mean()), 1),
    }


def _teacher(args: argparse.Namespace, index: int = 0) -> Path:
    """Teacher ``index``'s folder: the ``index``-th ``--teacher``, else a tiny model of
    ``TEACHER_MODELS[index]`` built into the cache (once)."""
    if index < len(args.teacher or []):
        return Path(args.teacher[index])
    architecture, tokenizer = TEACHER_MODELS[index]
    spec = TinyModelSpec(
        tokenizer, architecture, hidden=args.hidden, layers=args.layers,
        heads=max(1, args.hidden // 64),
    )  # fmt: skip
    # The first keeps its name of the single-teacher benchmark, so existing caches still serve.
    kind = "gpt2" if index == 0 else f"{architecture}-{tokenizer}"
    folder = args.cache_dir / "models" / f"bench-{kind}-h{args.hidden}-l{args.layers}"
    return build_tiny_model(spec, folder, args.cache_dir)


def _per_teacher(
    parser: argparse.ArgumentParser, text: str | None, flag: str, kind: type, teachers: int
) -> list[Any]:
    """A comma list of one value per teacher (``None`` for an empty entry); ``[None] * teachers``
    when the flag is not given."""
    if text is None:
        return [None] * teachers
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != teachers:
        parser.error(
            f"{flag} needs {teachers} comma-separated values (one per teacher); got {text!r}"
        )
    try:
        return [kind(part) if part else None for part in parts]
    except ValueError:
        parser.error(f"{flag}: {text!r} is not a list of {kind.__name__} values")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also used by the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--students", type=int, default=None,
        help="concurrent simulated students (default 8, or the sum of --teacher-students)",
    )  # fmt: skip
    add("--duration", type=float, default=60.0, help="seconds of load (requests in flight finish)")
    add("--max-requests", type=int, default=1_000_000, help="most requests per student")
    add("--tokenizers", nargs="+", default=list(FAMILIES), help="families, cycled over students")
    add("--batch", type=int, default=4, help="sequences per score request")
    add("--min-tokens", type=int, default=32, help="shortest completion (student tokens)")
    add("--max-tokens", type=int, default=64, help="longest completion (student tokens)")
    add("--top-k", type=int, default=TOP_K)
    add("--pool", type=int, default=64, help="distinct sequences per student, cycled")
    defaults = Retries()
    add("--max-retries", type=int, default=defaults.max_retries, help="retries of a 429/503")
    add("--backoff-base-s", type=float, default=defaults.backoff_base_s, help="first retry's cap")
    add("--backoff-max-s", type=float, default=defaults.backoff_max_s, help="longest backoff")
    add("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    add("--registration-timeout", type=float, default=600.0, help="seconds to register everyone")
    add("--seed", type=int, default=0)
    add("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    # the service
    add(
        "--teachers", type=int, default=1,
        help="teachers in the one service, named t0..t{N-1}, tiny models of different tokenizer "
        f"families ({', '.join(f'{a} over {t}' for a, t in TEACHER_MODELS)}); 1: one teacher, "
        "requests name none",
    )  # fmt: skip
    add(
        "--teacher", type=Path, action="append", default=None,
        help="teacher folder, repeated: the i-th is teacher i (default: the tiny models)",
    )  # fmt: skip
    add(
        "--teacher-students", default=None,
        help="students per teacher as a comma list, e.g. 7,1: the first 7 students ask t0, the "
        "next one t1 (default: round robin over the teachers)",
    )  # fmt: skip
    for key, (kind, example) in TEACHER_LIMITS.items():
        flag = "--" + key.replace("_", "-")
        add(
            "--teacher-" + flag[2:], default=None,
            help=f"per-teacher {flag}, a comma list of one {kind.__name__} per teacher (an "
            f"empty entry: {flag}'s value), e.g. {example}",
        )  # fmt: skip
    add(
        "--teacher-options", action="append", default=[],
        help="passed to serve as --teacher-options, repeated: tI.KEY=VALUE for any per-teacher key",
    )  # fmt: skip
    add("--hidden", type=int, default=256, help="tiny teachers' hidden size")
    add("--layers", type=int, default=4, help="tiny teachers' layers")
    add(
        "--max-tokens-in-flight", type=int, default=262144,
        help="service admission limit in teacher tokens; small (1000: about one request of the "
        "default shape at a time) provokes 429s, but keep it above the largest request "
        "(teacher_tokens_per_request.max in the result) or that request is refused with 413",
    )  # fmt: skip
    add(
        "--max-request-tokens", type=int, default=None, help="default: the in-flight limit, <=65536"
    )
    add(
        "--admission-wait-s", type=float, default=5.0,
        help="service: longest wait in line for admission before a 429 (0: refuse at once)",
    )  # fmt: skip
    add("--admission-queue", type=int, default=256, help="service: most requests in line")
    add("--batch-max-tokens", type=int, default=8192, help="service batcher: tokens per forward")
    add("--batch-wait-s", type=float, default=0.005, help="service batcher: longest wait")
    add("--request-timeout-s", type=float, default=120.0, help="service deadline (504)")
    add("--service-threads", type=int, default=None, help="OMP threads of the service process")
    add(
        "--data-dir", type=Path, default=None,
        help="service data dir: registrations and mapping tables (default: "
        "<cache>/bench-load-data, kept, so only the first run builds the tables)",
    )  # fmt: skip
    add(
        "--cache-dir", type=Path,
        default=Path(os.environ.get("TOKENBRIDGE_CACHE", REPO_ROOT / ".cache")),
    )  # fmt: skip
    args = parser.parse_args(argv)
    n = args.teachers
    if not 1 <= n <= len(TEACHER_MODELS) and not 1 <= n <= len(args.teacher or []):
        parser.error(
            f"--teachers must lie in 1..{len(TEACHER_MODELS)} (more: give each a --teacher path)"
        )
    if len(args.teacher or []) > n:
        parser.error(f"{len(args.teacher)} --teacher paths for --teachers {n}")
    args.teacher_names = [SINGLE_TEACHER] if n == 1 else [f"t{i}" for i in range(n)]
    if args.teacher_students is not None:
        counts = _per_teacher(parser, args.teacher_students, "--teacher-students", int, n)
        if any(c is None or c < 1 for c in counts):
            parser.error("--teacher-students: every teacher needs at least one student")
        if args.students is not None and args.students != sum(counts):
            parser.error(f"--students {args.students} but --teacher-students sums to {sum(counts)}")
        args.students = sum(counts)
        args.student_teachers = [i for i, c in enumerate(counts) for _ in range(c)]
    else:
        args.students = 8 if args.students is None else args.students
        args.student_teachers = [i % n for i in range(args.students)]
    args.teacher_limits = {
        key: _per_teacher(
            parser, getattr(args, "teacher_" + key), "--teacher-" + key.replace("_", "-"), kind, n
        )
        for key, (kind, _) in TEACHER_LIMITS.items()
    }
    if n == 1 and (args.teacher_options or any(v != [None] for v in args.teacher_limits.values())):
        parser.error("per-teacher options need --teachers 2 or more")
    if args.students < 1 or args.batch < 1 or args.duration <= 0 or args.max_requests < 1:
        parser.error("--students, --batch and --max-requests must be positive, --duration too")
    if args.max_retries < 0 or args.backoff_base_s < 0 or args.backoff_max_s < 0:
        parser.error("--max-retries and the backoff times must not be negative")
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    args.retries = Retries(args.max_retries, args.backoff_base_s, args.backoff_max_s)
    if args.max_request_tokens is None:
        args.max_request_tokens = min(65536, args.max_tokens_in_flight)
    return args


def _serve_args(args: argparse.Namespace, teachers: list[Path], data_dir: Path) -> list[str]:
    """``serve``'s command line: one teacher passed bare (named ``default``), several by name
    with their own admission limits as ``--teacher-options``."""
    out: list[str] = []
    if len(teachers) == 1:
        out += ["--teacher", str(teachers[0])]
    else:
        for name, path in zip(args.teacher_names, teachers, strict=True):
            out += ["--teacher", f"{name}={path}"]
        for key, values in args.teacher_limits.items():
            for name, value in zip(args.teacher_names, values, strict=True):
                if value is not None:
                    out += ["--teacher-options", f"{name}.{key}={value}"]
        for option in args.teacher_options:
            out += ["--teacher-options", option]
    flags = {
        "--host": LOOPBACK, "--data-dir": data_dir,
        "--max-tokens-in-flight": args.max_tokens_in_flight,
        "--max-request-tokens": args.max_request_tokens,
        "--admission-wait-s": args.admission_wait_s, "--admission-queue": args.admission_queue,
        "--batch-max-tokens": args.batch_max_tokens, "--batch-wait-s": args.batch_wait_s,
        "--request-timeout-s": args.request_timeout_s, "--log-level": "warning",
    }  # fmt: skip
    return out + [str(x) for pair in flags.items() for x in pair]


def _server_errors(statuses: Counter[str]) -> int:
    """Attempts answered 5xx other than 503 (a 503 is a refusal)."""
    return sum(n for s, n in statuses.items() if int(s) >= 500 and s != "503")


def _rate(count: float, seconds: float, digits: int = 1) -> float | None:
    return round(count / seconds, digits) if seconds > 0 else None


def _stage_s(tally: Tally) -> dict[str, float]:
    """Mean seconds per answered request in each stage, as the service timed them."""
    if not tally.answered:
        return {}
    return {k: round(v / tally.answered, 4) for k, v in sorted(tally.stage_s.items())}


_DESCRIBED = ("model", "backend", "dtype", "device", "vocab_size")


def _teacher_result(
    path: Path,
    described: dict[str, Any],
    students: list[Student],
    tally: Tally,
    server: dict[str, Any],
    load_s: float,
) -> dict[str, Any]:
    """One teacher's part of the result (``teachers[name]``)."""
    return {
        "path": str(path),
        **{k: described.get(k) for k in _DESCRIBED},
        "limits": described.get("limits"),
        "max_top_k": described.get("max_top_k"),
        "students": len(students),
        "student_tokenizers": [s.family for s in students],
        "requests": tally.requests,
        "answered": tally.answered,
        "refused_retried": tally.refused_retried,
        "attempts": tally.attempts,
        "statuses": dict(sorted(tally.statuses.items())),
        "refusals": {s: n for s, n in sorted(tally.statuses.items()) if s in ("429", "503")},
        "retry_wait_s": round(tally.retry_wait_s, 2),
        "errors": dict(sorted(tally.errors.items())),
        "lost": tally.lost,
        "server_errors": _server_errors(tally.statuses),
        "server": server,
        "accounting_matches": server["score_requests_by_status"] == dict(tally.statuses),
        "latency_ms": _percentiles(tally.latency_s),
        "attempt_latency_ms": _percentiles(tally.attempt_latency_s),
        "refusal_latency_ms": _percentiles(tally.refusal_latency_s),
        "positions": tally.positions,
        "positions_per_s": _rate(tally.positions, load_s),
        "teacher_tokens": tally.teacher_tokens,
        "teacher_tokens_per_s": _rate(tally.teacher_tokens, load_s),
        "requests_per_s": _rate(tally.answered, load_s, 2),
        "service_stage_s": _stage_s(tally),
    }


def main(argv: list[str] | None = None) -> int:
    """Start the service, run the students, print the JSON result last; 1 if anything was lost."""
    args = parse_args(argv)
    teachers = [_teacher(args, index) for index in range(args.teachers)]
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    data_dir = args.data_dir or args.cache_dir / "bench-load-data"
    env = {"TOKENBRIDGE_CACHE": str(args.cache_dir)}
    if args.service_threads:
        env["OMP_NUM_THREADS"] = str(args.service_threads)
    serve = _serve_args(args, teachers, data_dir)
    print(f"starting the service; encoding {args.students} students' sequences", file=sys.stderr)
    with ThreadPoolExecutor(1) as pool:  # encode while the service loads
        encoding = pool.submit(_students, args)
        served = serve_process(serve, work, env=env, timeout=300, cwd=REPO_ROOT)
        with served as (url, _, log_path):
            assert url.startswith(f"http://{LOOPBACK}:"), url
            students = encoding.result()
            print(f"service ready at {url} (log {log_path})", file=sys.stderr)
            info = unpack(httpx.get(url + "/v1/info", headers=HEADERS, timeout=10).content)
            described = {t["name"]: t for t in info.get("teachers") or []}
            if list(described) != args.teacher_names:
                raise RuntimeError(
                    f"the service hosts teachers {list(described)}, not {args.teacher_names}"
                )
            tallies, registrations, registration_s, load_s = asyncio.run(
                _drive(url, students, args)
            )
            server = _server_counts(url)
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    server_errors = _server_errors(total.statuses)
    refusals = {s: n for s, n in total.statuses.items() if s in ("429", "503")}
    several = args.teachers > 1
    groups = _by_teacher(students, tallies)
    per_teacher: dict[str, dict[str, Any]] = {}
    for name, path in zip(args.teacher_names, teachers, strict=True):
        own = [s for s in students if s.teacher == name]
        tally = groups.get(name, Tally())
        per_teacher[name] = _teacher_result(
            path, described[name], own, tally, server.teacher(name), load_s
        )
    accounting = server.total == dict(total.statuses)
    if several:
        accounting = accounting and all(t["accounting_matches"] for t in per_teacher.values())
    result = {
        "benchmark": "load",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        # Several teachers: none is the default; each is described under ``teachers``.
        "teacher": None
        if several
        else {"path": str(teachers[0]), **{k: info["teacher"][k] for k in _DESCRIBED}},
        "service": {
            "url": url,
            **info["limits"],
            "max_top_k": info["max_top_k"],
            "batch_max_tokens": args.batch_max_tokens,
            "batch_wait_s": args.batch_wait_s,
        },
        "students": len(students),
        "tokenizers": list(dict.fromkeys(s.family for s in students)),
        "student_tokenizers": [s.family for s in students],
        "batch": args.batch,
        "completion_tokens": [args.min_tokens, args.max_tokens],
        "top_k": args.top_k,
        "retries": asdict(args.retries),
        "requested_duration_s": args.duration,
        "duration_s": round(load_s, 2),
        "registration_s": round(registration_s, 2),
        "registrations": registrations,
        "requests": total.requests,
        "answered": total.answered,
        "refused_retried": total.refused_retried,
        "attempts": total.attempts,
        "statuses": dict(sorted(total.statuses.items())),
        "refusals": refusals,
        "retry_wait_s": round(total.retry_wait_s, 2),
        "refusals_without_retry_after": total.missing_retry_after,
        "retry_after_s": {
            "p50": float(np.median(total.retry_after_s)) if total.retry_after_s else None,
            "max": max(total.retry_after_s, default=None),
        },
        "errors": dict(sorted(total.errors.items())),
        "lost": total.lost,
        "server_errors": server_errors,
        "server": {"score_requests_by_status": dict(sorted(server.total.items()))},
        "accounting_matches": accounting,
        "latency_ms": _percentiles(total.latency_s),
        "attempt_latency_ms": _percentiles(total.attempt_latency_s),
        "refusal_latency_ms": _percentiles(total.refusal_latency_s),
        "sequences": total.sequences,
        "positions": total.positions,
        "unscored_positions": total.unscored_positions,
        "positions_per_s": _rate(total.positions, load_s),
        "teacher_tokens": total.teacher_tokens,
        "teacher_tokens_per_s": _rate(total.teacher_tokens, load_s),
        "teacher_tokens_per_request": {
            "mean": round(float(np.mean(total.request_teacher_tokens)), 1)
            if total.request_teacher_tokens
            else None,
            "max": max(total.request_teacher_tokens, default=None),
        },
        "requests_per_s": _rate(total.answered, load_s, 2),
        "service_stage_s": _stage_s(total),
        "per_student": [
            {
                "family": s.family,
                **({"teacher": s.teacher} if several else {}),
                "play": s.play,
                "requests": t.requests,
                "answered": t.answered,
                "refusals": t.refusals,
                "lost": t.lost,
                "latency_p50_ms": _percentiles(t.latency_s)["p50"],
            }
            for s, t in zip(students, tallies, strict=True)
        ],
        **({"teachers": per_teacher} if several else {}),
        "targets": TARGETS,
    }
    print(json.dumps(result))
    failed = bool(total.lost or server_errors)
    if not failed:  # keep the service's log when something went wrong
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
