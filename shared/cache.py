"""On-disk cache of vocabularies and pair tables: the one module of ``shared`` that touches files.

Entries are ``.npz`` files named by content hashes, written to a temporary name and renamed into
place, so a crash never leaves a truncated entry and concurrent writers agree on one result.
Vocabularies are keyed by a hash of the tokenizer's serialised form; pair tables by the pair of
vocabulary content hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tokenbridge.shared.tables import PairTable, build_pair_table
from tokenbridge.shared.vocab import VOCAB_FORMAT, Vocab, build_vocab

__all__ = ["TableCache", "folder_in_place", "tokenizer_fingerprint"]


@contextmanager
def folder_in_place(folder: Path | str) -> Iterator[Path]:
    """A fresh folder beside ``folder`` to write into; when the block ends without error it
    replaces ``folder`` (renamed into place), and otherwise it is removed. So a crash never leaves
    half a folder behind, and ``folder`` holds either the old contents or the new."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield work
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that ``build_vocab`` reads."""
    digest = hashlib.sha256(f"vocab-format-{VOCAB_FORMAT}".encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    extras = {
        "len": len(tokenizer),
        "roles": [getattr(tokenizer, f"{r}_token", None) for r in ("bos", "eos", "pad")],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


class TableCache:
    """Vocabularies and pair tables cached under ``root`` (created on first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _load(self, path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError):
            return None  # a damaged entry is rebuilt, never trusted

    def _store(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **arrays)  # type: ignore[arg-type]
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def vocab(self, tokenizer: Any, name: str | None = None) -> Vocab:
        """The ``Vocab`` of ``tokenizer``, built once and then read from disk."""
        path = self.root / "vocab" / f"{tokenizer_fingerprint(tokenizer)}.npz"
        arrays = self._load(path)
        if arrays is not None:
            try:
                return Vocab.from_arrays(arrays)
            except (KeyError, ValueError):
                pass
        vocab = build_vocab(tokenizer, name)
        self._store(path, vocab.to_arrays())
        return vocab

    def pair_path(self, teacher: Vocab, student: Vocab) -> Path:
        """Where the pair table of ``teacher`` × ``student`` lives."""
        return self._pair_path(teacher.content_hash, student.content_hash)

    def _pair_path(self, teacher_hash: str, student_hash: str) -> Path:
        return self.root / "pairs" / f"{teacher_hash}-{student_hash}.npz"

    def pair_table(self, teacher: Vocab, student: Vocab) -> PairTable:
        """The §4 table of ``teacher`` × ``student``, built once and then read from disk."""
        path = self.pair_path(teacher, student)
        arrays = self._load(path)
        if arrays is not None:
            try:
                table = PairTable.from_arrays(arrays)
                if (table.teacher_hash, table.student_hash) == (
                    teacher.content_hash,
                    student.content_hash,
                ):
                    return table
            except (KeyError, ValueError):
                pass
        table = build_pair_table(teacher, student)
        self.save_pair_table(table)
        return table

    def save_pair_table(self, table: PairTable) -> Path:
        """Store ``table`` under its pair of content hashes; return where it went."""
        path = self._pair_path(table.teacher_hash, table.student_hash)
        self._store(path, table.to_arrays())
        return path
