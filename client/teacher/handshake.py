"""The handshake with each replica: ``/v1/info`` narrowed to one teacher (``teacher_view``), the
top-K check, the student's registration, agreement between replicas, and the re-check of a
replica that comes back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tokenbridge.client.errors import (
    TeacherConfigError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
    UnknownTeacherError,
)
from tokenbridge.client.teacher.config import TeacherClientConfig
from tokenbridge.client.teacher.pool import ReplicaPool, _Replica, _Retryable
from tokenbridge.shared.protocol import (
    API_VERSION,
)

logger = logging.getLogger("tokenbridge.client.teacher")


#: Keys of an entry of ``/v1/info``'s ``teachers`` that describe the service's work for that
#: teacher rather than the teacher itself; the rest of the entry is the teacher's description.
_SERVICE_KEYS = ("state", "ready", "max_top_k", "limits")


def teacher_view(
    info: Mapping[str, Any], name: str | None, url: str | None = None
) -> dict[str, Any]:
    """``GET /v1/info`` as a client of teacher ``name`` sees it (``None``: the default teacher).

    A service hosting several teachers lists them under ``teachers``; the answer is ``info`` with
    its top-level ``teacher`` (gaining ``name``), ``max_top_k``, ``limits`` and ``state`` taken
    from that teacher's entry, so every check reads the teacher it will use. A service without
    ``teachers`` (older versions) hosts one unnamed teacher: ``info`` as it is for ``None``.
    ``UnknownTeacherError`` (naming the teachers there are) when the service has no such teacher,
    or several and no default while ``name`` is ``None``.
    """
    where = f" at {url}" if url else ""
    teachers = info.get("teachers")
    if teachers is None:
        if name is None:
            return dict(info)
        raise UnknownTeacherError(
            f"the service{where} hosts one unnamed teacher (a version without named teachers); "
            f"it cannot serve teacher {name!r}: leave the teacher name unset",
            name=name,
            available=(),
            url=url,
        )
    if not isinstance(teachers, list):
        raise TeacherConfigError(
            f"GET /v1/info{where} has 'teachers' that is not a list: {type(teachers).__name__}",
            url=url,
        )
    entries = {
        entry["name"]: entry
        for entry in teachers
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
    }
    names = tuple(entries)
    wanted = name
    if wanted is None:
        default = info.get("default_teacher")
        # One teacher is the default even if the service did not say so.
        wanted = default if isinstance(default, str) else names[0] if len(names) == 1 else None
        if wanted is None:
            raise UnknownTeacherError(
                f"the service{where} hosts several teachers {list(names)} and none is its "
                "default: name the one to use (TeacherClientConfig.teacher, or --teachers)",
                name=None,
                available=names,
                url=url,
            )
    entry = entries.get(wanted)
    if entry is None and name is None:
        # The default is named but not listed: the top-level keys describe it.
        view = dict(info)
        view["teacher"] = {**(info.get("teacher") or {}), "name": wanted}
        return view
    if entry is None:
        raise UnknownTeacherError(
            f"the service{where} hosts no teacher {wanted!r}; it hosts {list(names)}",
            name=wanted,
            available=names,
            url=url,
        )
    view = dict(info)
    view["teacher"] = {k: v for k, v in entry.items() if k not in _SERVICE_KEYS}
    view["max_top_k"] = entry.get("max_top_k", info.get("max_top_k"))
    view["limits"] = entry.get("limits") or info.get("limits") or {}
    view["state"] = entry.get("state", info.get("state"))
    return view


# -- replicas ----------------------------------------------------------------------------------


class ReplicaHandshake(ReplicaPool):
    """Start-up and re-checks of replicas: read ``/v1/info`` as this client's teacher sees it,
    check ``top_k``, register the student, and check that the replicas agree."""

    config: TeacherClientConfig
    _registration: dict[str, Any] | None
    _student_id: str | None
    _teacher_info: dict[str, Any] | None

    async def _handshake_all(self) -> dict[_Replica, Any]:
        """Every replica's handshake outcome (a result or an exception), concurrently.

        Each replica gets the full retry budget while none has answered (a fleet that is still
        loading). Once one has, the others get ``connect_timeout_s`` more: a replica that is down
        must not hold up the start for its whole backoff; it is verified later, when it answers.
        """
        tasks = {
            asyncio.ensure_future(self._handshake(r, self.config.max_retries)): r
            for r in self._replicas
        }
        outcomes: dict[_Replica, Any] = {}
        pending = set(tasks)
        loop = asyncio.get_running_loop()
        grace_until: float | None = None
        try:
            while pending:
                timeout = None if grace_until is None else max(0.0, grace_until - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                for task in done:
                    error = task.exception()
                    outcomes[tasks[task]] = error if error is not None else task.result()
                    if error is None and grace_until is None:
                        grace_until = loop.time() + self.config.connect_timeout_s
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            outcomes[tasks[task]] = TeacherUnavailableError(
                f"{tasks[task].url} had not answered when the other replicas were ready",
                url=tasks[task].url,
            )
        return outcomes

    def _check_agreement(self, answered: list[tuple[_Replica, dict[str, Any], str | None]]) -> None:
        hashes = {r.url: info["teacher"]["vocab_hash"] for r, info, _ in answered}
        if len(set(hashes.values())) > 1:
            raise TeacherConfigError(
                f"the replicas serve different teacher vocabularies (vocab_hash by URL: {hashes}); "
                "point the client at replicas of one teacher"
            )
        ids = {r.url: student for r, _, student in answered}
        if len(set(ids.values())) > 1:
            raise TeacherConfigError(
                f"the replicas gave the student tokenizer different ids ({ids}); they hash "
                "tokenizers differently: run the same tokenbridge version on every replica"
            )

    async def _handshake(
        self, replica: _Replica, retries: int
    ) -> tuple[dict[str, Any], str | None, bool]:
        """Read the replica's info, check ``top_k``, register the student.

        Returns the info as this client's teacher sees it (``teacher_view``), the student's id
        and whether the registration was new on the replica. The registration is the service's,
        shared by all its teachers.
        """
        try:
            info = await self._request("GET", "/v1/info", pin=replica, retries=retries)
        except TeacherRequestError as error:
            raise TeacherConfigError(
                f"GET /v1/info on {replica.url} was refused: {error.message} (HTTP {error.status}; "
                "check api_key)",
                url=replica.url,
            ) from error
        unreadable = f"GET /v1/info on {replica.url} is not readable as a teacher service's info"
        if not isinstance(info, Mapping):
            raise TeacherConfigError(
                f"{unreadable}; is the URL a tokenbridge teacher?", url=replica.url
            )
        version = info.get("api_version", API_VERSION)
        if version != API_VERSION:
            raise TeacherConfigError(
                f"{replica.url} speaks API {version!r}; this client speaks {API_VERSION!r}",
                url=replica.url,
            )
        # The checks below read the teacher this client will use, not the service's default.
        info = teacher_view(info, self.config.teacher, replica.url)
        try:
            max_top_k = int(info["max_top_k"])
            vocab_hash = info["teacher"]["vocab_hash"]
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherConfigError(
                f"{unreadable} ({error!r}); is the URL a tokenbridge teacher?",
                url=replica.url,
            ) from None
        if not vocab_hash:
            raise TeacherConfigError(
                f"{replica.url} reports no teacher vocab_hash", url=replica.url
            )
        if self.config.top_k > max_top_k and self.config.clamp_top_k:
            logger.info("top_k %d lowered to %s's max_top_k %d", self.config.top_k, replica.url,
                     max_top_k)  # fmt: skip
            self.config = replace(self.config, top_k=max_top_k)
        if self.config.top_k > max_top_k:
            which = f"teacher {self.config.teacher!r}" if self.config.teacher else "teacher"
            raise TeacherConfigError(
                f"top_k {self.config.top_k} is above the {which}'s max_top_k {max_top_k} at "
                f"{replica.url}: ask for top_k <= {max_top_k}, or start the service with a "
                f"larger --max-top-k",
                url=replica.url,
            )
        if self._registration is None:
            return info, None, False
        try:
            answer = await self._request(
                "POST", "/v1/tokenizers", self._registration, pin=replica, retries=retries
            )
        except TeacherRequestError as error:
            raise TeacherConfigError(
                f"the teacher at {replica.url} refused the student tokenizer "
                f"{self._registration['name']!r}: {error.message}",
                url=replica.url,
            ) from error
        student_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(student_id, str) or not student_id:
            raise TeacherProtocolError(
                f"the registration answer of {replica.url} has no id", url=replica.url
            )
        logger.info(
            "student %s %s on %s",
            student_id, "registered" if answer.get("created") else "already registered",
            replica.url,
        )  # fmt: skip
        return info, student_id, bool(answer.get("created"))

    async def _verify(self, replica: _Replica) -> _Retryable | None:
        """Re-check a replica that was unreachable or lost the student, before trusting it.

        One attempt per call (the caller's retry loop does the retrying); a replica that is still
        unreachable comes back as ``_Retryable``. Concurrent callers wait for one check.
        """
        async with replica.lock:
            if replica.verified:
                return None
            try:
                info, student_id, created = await self._handshake(replica, retries=0)
            except TeacherUnavailableError as error:
                return _Retryable(str(error))
            assert self._teacher_info is not None  # set by start(), before any unpinned call
            expected = self._teacher_info["teacher"]["vocab_hash"]
            if info["teacher"]["vocab_hash"] != expected:
                raise TeacherConfigError(
                    f"{replica.url} came back serving another teacher vocabulary "
                    f"({info['teacher']['vocab_hash']}, expected {expected})",
                    url=replica.url,
                )
            if student_id != self._student_id:
                raise TeacherConfigError(
                    f"{replica.url} came back and gave the student id {student_id}, not "
                    f"{self._student_id}: it hashes tokenizers differently (another version?)",
                    url=replica.url,
                )
            if created:
                # The replica had lost the student (a fresh data dir): worth a line in the logs.
                self._stats.reregistrations += 1
            replica.verified = True
            return None
