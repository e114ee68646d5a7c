"""The student tokenizer registry: register once, score many times, survive restarts.

A registration is stored as ``<root>/students/<id>/`` (the tokenizer's ``save_pretrained`` files
plus ``registration.json``); ``id`` is a hash of the tokenizer's content, so registering the same
tokenizer twice returns the same id. Vocabularies and (teacher, student) pair tables are kept by a
``TableCache`` under ``<root>/tables`` and read back after a restart instead of rebuilt.
All methods block (tokenizer loading, table builds): the app calls them in a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenbridge.service.errors import (
    NotFoundError,
    UnprocessableError,
    tokenizer_failures_are_unprocessable,
)
from tokenbridge.shared import responses
from tokenbridge.shared.align import align, encode_continuation, teacher_view, token_widths
from tokenbridge.shared.cache import TableCache, tokenizer_fingerprint
from tokenbridge.shared.errors import TokenbridgeError, one_line_reason
from tokenbridge.shared.mapping import PairMapper
from tokenbridge.shared.protocol import RegisterTokenizerRequest
from tokenbridge.shared.vocab import Vocab

__all__ = ["StudentEntry", "StudentRegistry", "check_hub_name", "resolve_inside"]

logger = logging.getLogger("tokenbridge.service.registry")

_RECORD = "registration.json"


@dataclass(frozen=True)
class Pairing:
    """How one student maps onto one teacher: the pair's mapper and how well the pair fits."""

    teacher: str
    mapper: PairMapper
    vocab_overlap: float
    probe_one_to_one_share: float

    def describe(self) -> responses.Pairing:
        """The pair's figures as registration answers give them."""
        return {
            "vocab_overlap": self.vocab_overlap,
            "probe_one_to_one_share": self.probe_one_to_one_share,
            "special_token_map": {str(s): t for s, t in self.mapper.special_map.items()},
        }


@dataclass(frozen=True)
class StudentEntry:
    """One registered student tokenizer; its pairings with teachers live in the registry."""

    id: str
    name: str
    source: responses.StudentSource
    created: float
    tokenizer: Any
    vocab: Vocab

    def summary(self) -> responses.StudentSummary:
        """What ``GET /v1/tokenizers`` lists about this student."""
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "vocab_size": self.vocab.size,
            "vocab_hash": self.vocab.content_hash,
            "scheme": self.vocab.scheme,
        }

    def describe(
        self, pairings: dict[str, Pairing], default: str | None
    ) -> responses.StudentDescription:
        """What ``GET /v1/tokenizers/{id}`` answers: the summary plus how well the student maps
        onto each teacher (``teachers``); the default teacher's figures also stand at the top."""
        roles = {role: token for role, token in self.vocab.roles.items() if token is not None}
        described: responses.StudentDescription = {
            **self.summary(),
            "roles": roles,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "teachers": {name: pairing.describe() for name, pairing in pairings.items()},
        }
        if default is not None and default in pairings:
            described.update(pairings[default].describe())
        return described


def _default_loader(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    # Never run code that came with a tokenizer: registrations come from the network.
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


# A hub repository id: ``name`` or ``org/name``. Anything else (absolute or relative paths, ``..``,
# ``~``, backslashes, URLs) could make a loader read the service's own file system.
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def check_hub_name(name: str) -> str:
    """``name`` when it is a plain hub repository id; ``UnprocessableError`` otherwise."""
    if not _HUB_NAME.fullmatch(name) or ".." in name or Path(name).exists():
        raise UnprocessableError(
            f"hub {name[:200]!r} is not a hub repository id ('name' or 'org/name' of letters, "
            "digits, '.', '_' and '-'); register a folder on the service with 'path' (inside its "
            "data dir) or upload the tokenizer with 'tokenizer_json'"
        )
    return name


def resolve_inside(path: str, roots: Sequence[Path]) -> Path:
    """``path`` (relative paths are taken from the first root) resolved, with every symlink and
    ``..`` followed, when it lies inside one of ``roots``; ``UnprocessableError`` otherwise."""
    if not path or "\x00" in path:
        raise UnprocessableError("path must be a non-empty folder name without NUL bytes")
    candidate = Path(path).expanduser() if path.startswith("~") else Path(path)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise UnprocessableError(
        f"path {path[:200]!r} is outside the folders tokenizers may be read from ({allowed}); "
        "copy the tokenizer there, or upload it with 'tokenizer_json'"
    )


class StudentRegistry:
    """Registered students, shared by every teacher of the service, persisted under ``root``.

    Teachers join with ``add_teacher``; each (teacher, student) pair gets its ``Pairing`` (mapper,
    overlap, probe share), built once and kept, its tables cached on disk by both vocabularies'
    hashes.
    """

    def __init__(
        self,
        root: Path | str,
        probe_text: str,
        loader: Callable[[str], Any] = _default_loader,
        tokenizer_dirs: Sequence[Path | str] = (),
    ) -> None:
        self.root = Path(root)
        # Folders a ``path`` registration may name: the data dir first, then any the operator adds.
        self.tokenizer_dirs = (self.root, *(Path(d) for d in tokenizer_dirs))
        self.students_dir = self.root / "students"
        self.tables = TableCache(self.root / "tables")
        self.probe_text = probe_text
        self._loader = loader
        self._entries: dict[str, StudentEntry] = {}
        self._teachers: dict[str, tuple[Any, Vocab]] = {}
        self._pairings: dict[tuple[str, str], Pairing] = {}
        self._lock = threading.RLock()

    # -- teachers ------------------------------------------------------------------------------

    def add_teacher(self, name: str, tokenizer: Any) -> Vocab:
        """Make teacher ``name`` known and pair it with every registered student (a student that
        cannot be paired is logged and left for its first request to report); its vocabulary."""
        vocab = self.tables.vocab(tokenizer, f"teacher {name}")
        with self._lock:
            self._teachers[name] = (tokenizer, vocab)
            for key in [k for k in self._pairings if k[0] == name]:
                del self._pairings[key]  # a restarted teacher may come back with other files
            entries = list(self._entries.values())
        for entry in entries:
            try:
                self.pairing(name, entry)
            except UnprocessableError as error:
                logger.warning(
                    "student %s does not pair with teacher %s: %s", entry.id, name, error
                )
        return vocab

    def teacher_vocab(self, name: str) -> Vocab | None:
        """The vocabulary of teacher ``name``, once it has joined."""
        known = self._teachers.get(name)
        return None if known is None else known[1]

    def pairing(self, teacher: str, student: StudentEntry) -> Pairing:
        """The (teacher, student) pair's mapper and figures, built on first use."""
        key = (teacher, student.id)
        found = self._pairings.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._pairings.get(key)
            if found is None:
                found = self._pair(teacher, student.tokenizer, student.vocab, student.name)
                self._pairings[key] = found
        return found

    def pairings(self, student: StudentEntry) -> dict[str, Pairing]:
        """The student's pairing with every teacher that has joined, by teacher name."""
        return {name: self.pairing(name, student) for name in list(self._teachers)}

    def _pair(self, teacher: str, tokenizer: Any, vocab: Vocab, name: str) -> Pairing:
        known = self._teachers.get(teacher)
        if known is None:
            raise NotFoundError(f"teacher {teacher!r} has not started")
        teacher_tokenizer, teacher_vocab = known
        try:
            table = self.tables.pair_table(teacher_vocab, vocab)
            mapper = PairMapper(teacher_vocab, vocab, table).prepare()
        except TokenbridgeError as error:
            raise UnprocessableError(
                f"tokenizer {name!r} cannot be mapped onto teacher {teacher!r}: {error}"
            ) from None
        student_bytes = [b for b, s in zip(vocab.token_bytes, vocab.special, strict=True) if not s]
        teacher_known = teacher_vocab.id_of_bytes
        overlap = sum(1 for b in student_bytes if b in teacher_known) / max(1, len(student_bytes))
        share = self._probe_share(tokenizer, vocab, teacher_tokenizer, teacher_vocab)
        return Pairing(teacher, mapper, overlap, share)

    # -- loading -------------------------------------------------------------------------------

    def load_all(self) -> int:
        """Read every stored registration back (after a restart); return how many loaded.

        A registration that no longer loads is logged and skipped, never fatal.
        """
        if not self.students_dir.is_dir():
            return 0
        for folder in sorted(self.students_dir.iterdir()):
            record_path = folder / _RECORD
            if folder.name.startswith(".") or not record_path.is_file():
                continue
            try:
                record = json.loads(record_path.read_text())
                tokenizer = _default_loader(str(folder))
                # The id stays the one clients were given, whatever a reload would hash to.
                entry = self._entry(
                    folder.name, tokenizer, record["name"], record["source"], record["created"]
                )
                self._entries[entry.id] = entry
            except Exception as error:
                logger.warning("skipping stored student %s: %r", folder.name, error)
        return len(self._entries)

    # -- queries -------------------------------------------------------------------------------

    def get(self, student_id: str) -> StudentEntry:
        """The registration ``student_id``; ``NotFoundError`` (404) when there is none."""
        entry = self._entries.get(student_id)
        if entry is None:
            raise NotFoundError(
                f"no student tokenizer {student_id!r} is registered; register it with "
                "POST /v1/tokenizers (GET /v1/tokenizers lists the registered ones)"
            )
        return entry

    def list(self) -> list[StudentEntry]:
        """Every registration, oldest first."""
        return sorted(self._entries.values(), key=lambda e: (e.created, e.id))

    def __len__(self) -> int:
        return len(self._entries)

    # -- changes -------------------------------------------------------------------------------

    def register(self, request: RegisterTokenizerRequest) -> tuple[StudentEntry, bool]:
        """Register the tokenizer ``request`` describes; return it and whether it was new."""
        tokenizer, source = self._load_requested(request)
        try:
            student_id = tokenizer_fingerprint(tokenizer)
        except Exception as error:
            reason = one_line_reason(error)
            raise UnprocessableError(f"cannot read the tokenizer: {reason}") from None
        with self._lock:
            existing = self._entries.get(student_id)
            if existing is not None:
                return existing, False
            entry, pairings = self._checked_entry(student_id, tokenizer, request.name, source)
            self._store(entry)
            self._entries[entry.id] = entry
            for pairing in pairings:
                self._pairings[(pairing.teacher, entry.id)] = pairing
        logger.info("registered student %s (%s) from %s", entry.id, entry.name, source["kind"])
        return entry, True

    def delete(self, student_id: str) -> StudentEntry:
        """Remove a registration and its stored files; ``NotFoundError`` when there is none."""
        with self._lock:
            entry = self.get(student_id)
            del self._entries[student_id]
            for key in [k for k in self._pairings if k[1] == student_id]:
                del self._pairings[key]
            shutil.rmtree(self.students_dir / student_id, ignore_errors=True)
        return entry

    # -- internals -----------------------------------------------------------------------------

    def _load_requested(
        self, request: RegisterTokenizerRequest
    ) -> tuple[Any, responses.StudentSource]:
        source: responses.StudentSource
        with tokenizer_failures_are_unprocessable("cannot load the tokenizer"):
            if request.tokenizer_json is not None:
                tokenizer = self._from_json(request)
                source = {"kind": "tokenizer_json"}
            elif request.path is not None:
                path = resolve_inside(request.path, self.tokenizer_dirs)
                if not path.is_dir():
                    raise UnprocessableError(
                        f"path {request.path[:200]!r} is not a folder on the service (it does not "
                        "exist or is a file)"
                    )
                tokenizer = _default_loader(str(path))
                source = {"kind": "path", "path": str(path)}
            else:
                assert request.hub is not None
                tokenizer = self._loader(check_hub_name(request.hub))
                source = {"kind": "hub", "hub": request.hub}
        if not getattr(tokenizer, "is_fast", False):
            raise UnprocessableError("the tokenizer has no fast (Rust) implementation")
        if request.chat_template is not None:
            tokenizer.chat_template = request.chat_template
        return tokenizer, source

    @staticmethod
    def _from_json(request: RegisterTokenizerRequest) -> Any:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        allowed = {"bos_token", "eos_token", "pad_token", "unk_token"}
        specials = dict(request.special_tokens or {})
        unknown = sorted(set(specials) - allowed)
        if unknown:
            raise UnprocessableError(
                f"special_tokens keys must be among {sorted(allowed)}; got {unknown}"
            )
        backend = Tokenizer.from_str(request.tokenizer_json or "")
        return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)

    def _checked_entry(
        self, student_id: str, tokenizer: Any, name: str, source: responses.StudentSource
    ) -> tuple[StudentEntry, tuple[Pairing, ...]]:
        """``_entry`` for a new registration and its pairing with every teacher: whatever a
        strange tokenizer makes the vocabulary or table code raise is the registration's fault
        (422), logged in full for the operator."""
        with tokenizer_failures_are_unprocessable(f"tokenizer {name!r} cannot be mapped", logger):
            entry = self._entry(student_id, tokenizer, name, source, time.time())
            pairings = tuple(
                self._pair(teacher, tokenizer, entry.vocab, name)
                for teacher in list(self._teachers)
            )
            return entry, pairings

    def _entry(
        self,
        student_id: str,
        tokenizer: Any,
        name: str,
        source: responses.StudentSource,
        created: float,
    ) -> StudentEntry:
        try:
            vocab = self.tables.vocab(tokenizer, name)
        except TokenbridgeError as error:
            raise UnprocessableError(f"tokenizer {name!r} cannot be mapped: {error}") from None
        if vocab.roles.get("eos") is None and vocab.roles.get("eot") is None:
            raise UnprocessableError(
                f"tokenizer {name!r} is not generative: it has no end-of-sequence token (give "
                "special_tokens.eos_token, or register a causal LM's tokenizer)"
            )
        return StudentEntry(
            id=student_id,
            name=name,
            source=source,
            created=created,
            tokenizer=tokenizer,
            vocab=vocab,
        )

    def _probe_share(
        self, tokenizer: Any, vocab: Vocab, teacher_tokenizer: Any, teacher_vocab: Vocab
    ) -> float:
        try:
            ids = np.asarray(encode_continuation(tokenizer, vocab, self.probe_text), dtype=np.int64)
            view = teacher_view(ids, vocab, teacher_tokenizer, teacher_vocab)
            alignment = align(token_widths(vocab, ids), view.widths)
        except TokenbridgeError:
            return 0.0
        return alignment.report(view.untiled_bytes).one_to_one_share

    def _store(self, entry: StudentEntry) -> None:
        self.students_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{entry.id}-", dir=self.students_dir))
        try:
            entry.tokenizer.save_pretrained(str(workdir))
            record = {
                "id": entry.id,
                "name": entry.name,
                "source": entry.source,
                "created": entry.created,
            }
            (workdir / _RECORD).write_text(json.dumps(record, indent=2))
            target = self.students_dir / entry.id
            if target.exists():
                shutil.rmtree(target)
            os.rename(workdir, target)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
