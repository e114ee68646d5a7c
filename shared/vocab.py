"""Byte-exact vocabularies: the byte string of every token id, special-token roles, a content hash.

Every tokenizer the project handles is reduced to one ``Vocab``: for each id the exact bytes it
stands for (byte-level BPE pieces inverted through GPT-2's byte-to-unicode table; SentencePiece
pieces with ``▁`` as a space and ``<0xNN>`` as the byte ``NN``), a flag for special tokens (which
stand for no bytes at all) and a role table (bos, eos, end of turn, pad) derived from the
tokenizer's own attributes and chat template. Everything after this module works on bytes only,
which is what makes the mapping between families exact.

The module does no I/O: ``Vocab.to_arrays``/``Vocab.from_arrays`` give plain arrays that
``tokenbridge.shared.cache`` stores.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from tokenbridge.shared.errors import TokenizerUnsupportedError

__all__ = [
    "ROLES",
    "Vocab",
    "build_vocab",
    "byte_to_unicode",
    "rolling_prefix_hashes",
]

#: Roles a special token can play; students' and teachers' specials are matched by role only.
ROLES = ("bos", "eos", "eot", "pad")

#: Bumped whenever the byte extraction changes, so cached tables built by older code are ignored.
VOCAB_FORMAT = 2

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15 | 1)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def meta_to_array(meta: Mapping[str, Any]) -> np.ndarray:
    """JSON metadata as a uint8 array, so it travels inside an ``.npz`` without pickling."""
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def meta_from_arrays(arrays: Mapping[str, np.ndarray], expected_format: int) -> dict[str, Any]:
    """Inverse of ``meta_to_array`` for ``arrays["meta"]``; refuses another format version."""
    meta = json.loads(np.asarray(arrays["meta"], dtype=np.uint8).tobytes())
    if meta.get("format") != expected_format:
        raise ValueError(f"arrays of format {meta.get('format')}, need {expected_format}")
    return meta


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for value in range(256):
        if value not in printable:
            printable.append(value)
            chars.append(256 + extra)
            extra += 1
    return {value: chr(char) for value, char in zip(printable, chars, strict=True)}


def rolling_prefix_hashes(flat_bytes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Hash of every non-empty prefix of every token, laid out like ``flat_bytes``.

    ``result[starts[i] + L - 1]`` is the polynomial hash (mod 2**64) of the first ``L`` bytes of
    token ``i``. Equal prefixes of different tokens get equal hashes, which lets the mapping test
    "token u starts with these bytes" for many candidates at once. Computed level by level, so the
    cost is the total number of bytes, in numpy.
    """
    lengths = np.diff(starts)
    hashes = np.zeros(len(flat_bytes), dtype=np.uint64)
    alive = np.flatnonzero(lengths > 0)
    previous = np.zeros(len(alive), dtype=np.uint64)
    level = 0
    with np.errstate(over="ignore"):
        while len(alive):
            positions = starts[alive] + level
            current = previous * _HASH_MULTIPLIER + (flat_bytes[positions].astype(np.uint64) + 1)
            hashes[positions] = current
            level += 1
            keep = lengths[alive] > level
            alive, previous = alive[keep], current[keep]
    return hashes


@dataclass(frozen=True, eq=False)
class Vocab:
    """The byte view of one tokenizer.

    ``starts``/``flat`` hold every token's bytes back to back (special tokens are empty);
    ``special`` marks tokens that stand for no text; ``roles`` names the special ids by role;
    ``canonical_overrides`` maps each id whose byte string several ids share to the id the
    tokenizer itself emits for those bytes.
    """

    name: str
    flat: np.ndarray
    starts: np.ndarray
    special: np.ndarray
    roles: Mapping[str, int | None]
    scheme: str
    content_hash: str
    canonical_overrides: Mapping[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of token ids (``len(tokenizer)``)."""
        return len(self.special)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Byte length of every token, ``int64[V]`` (0 for special tokens)."""
        return np.diff(self.starts)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The byte string of every id (empty for special tokens)."""
        data = self.flat.tobytes()
        bounds = self.starts.tolist()
        return [data[bounds[i] : bounds[i + 1]] for i in range(self.size)]

    @cached_property
    def prefix_hashes(self) -> np.ndarray:
        """``rolling_prefix_hashes`` of this vocabulary (see there)."""
        return rolling_prefix_hashes(self.flat, self.starts)

    @cached_property
    def id_of_bytes(self) -> dict[bytes, int]:
        """Canonical id for every byte string that some non-special token spells."""
        table: dict[bytes, int] = {}
        for token_id, data in enumerate(self.token_bytes):
            if data and not self.special[token_id]:
                table.setdefault(data, token_id)
        for token_id, canonical in self.canonical_overrides.items():
            table[self.token_bytes[token_id]] = canonical
        return table

    def bytes_of(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Concatenated bytes of ``ids`` (special tokens contribute nothing)."""
        token_bytes = self.token_bytes
        return b"".join(token_bytes[i] for i in np.asarray(ids, dtype=np.int64).tolist())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays from which ``from_arrays`` rebuilds this vocabulary (for caching)."""
        meta = {
            "name": self.name,
            "roles": dict(self.roles),
            "scheme": self.scheme,
            "content_hash": self.content_hash,
            "canonical_overrides": {str(k): v for k, v in self.canonical_overrides.items()},
            "format": VOCAB_FORMAT,
        }
        return {
            "flat": self.flat,
            "starts": self.starts,
            "special": self.special,
            "meta": meta_to_array(meta),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Vocab:
        """Inverse of ``to_arrays``."""
        meta = meta_from_arrays(arrays, VOCAB_FORMAT)
        return cls(
            name=meta["name"],
            flat=np.asarray(arrays["flat"], dtype=np.uint8),
            starts=np.asarray(arrays["starts"], dtype=np.int64),
            special=np.asarray(arrays["special"], dtype=bool),
            roles=meta["roles"],
            scheme=meta["scheme"],
            content_hash=meta["content_hash"],
            canonical_overrides={int(k): v for k, v in meta["canonical_overrides"].items()},
        )


def _decoder_kinds(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    kinds = [node.get("type", "")]
    for child in node.get("decoders", []) or []:
        kinds.extend(_decoder_kinds(child))
    return kinds


def _detect_scheme(backend_json: dict[str, Any]) -> str:
    kinds = _decoder_kinds(backend_json.get("decoder"))
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or "Replace" in kinds:
        return "sentencepiece"
    model_type = (backend_json.get("model") or {}).get("type")
    raise TokenizerUnsupportedError(
        f"cannot recover token bytes from a {model_type} tokenizer with decoder {kinds or None}: "
        "only byte-level BPE and SentencePiece-style (▁ / <0xNN>) tokenizers are supported; "
        "WordPiece and other non-generative tokenizers cannot be mapped byte-exactly"
    )


def _piece_bytes_sentencepiece(piece: str) -> bytes:
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def _eot_from_chat_template(tokenizer: Any, specials: dict[str, int]) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7ReplyMarker"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:
        return None
    if not isinstance(rendered, str) or marker not in rendered:
        return None
    after = rendered[rendered.rindex(marker) + len(marker) :].lstrip(" ")
    for content in sorted(specials, key=len, reverse=True):
        if content and after.startswith(content):
            return specials[content]
    return None


def _roles(tokenizer: Any, specials: dict[str, int]) -> dict[str, int | None]:
    def attr_id(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        return int(value) if isinstance(value, int) else None

    roles: dict[str, int | None] = {name: attr_id(name) for name in ("bos", "eos", "pad")}
    eot = _eot_from_chat_template(tokenizer, specials)
    roles["eot"] = eot if eot is not None else roles["eos"]
    return roles


def build_vocab(tokenizer: Any, name: str | None = None) -> Vocab:
    """Build the byte view of a Hugging Face fast tokenizer.

    Raises ``TokenizerUnsupportedError`` for tokenizers whose pieces do not spell bytes (WordPiece,
    Unigram without byte pieces), so a bad student is refused up front rather than mis-mapped.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerUnsupportedError(
            "only fast (Rust-backed) Hugging Face tokenizers are supported"
        )
    backend_json = json.loads(backend.to_str())
    scheme = _detect_scheme(backend_json)
    size = len(tokenizer)
    added = backend.get_added_tokens_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))

    special = np.zeros(size, dtype=bool)
    chunks: list[bytes] = []
    if scheme == "byte_level":
        inverse = {char: value for value, char in byte_to_unicode().items()}
    for token_id, piece in enumerate(pieces):
        added_token = added.get(token_id)
        if added_token is not None:
            if added_token.special:
                special[token_id] = True
                chunks.append(b"")
            else:
                chunks.append(added_token.content.encode("utf-8"))
            continue
        if piece is None:
            raise TokenizerUnsupportedError(f"token id {token_id} has no piece")
        if scheme == "byte_level":
            try:
                chunks.append(bytes(inverse[char] for char in piece))
            except KeyError as missing:
                raise TokenizerUnsupportedError(
                    f"token {token_id} ({piece!r}) has a character {missing} outside the "
                    "byte-level alphabet"
                ) from None
        else:
            chunks.append(_piece_bytes_sentencepiece(piece))

    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=size)
    starts = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()

    special_contents = {added[i].content: i for i in added if added[i].special}
    roles = _roles(tokenizer, special_contents)

    overrides = _canonical_overrides(tokenizer, chunks, special)

    digest = hashlib.sha256()
    digest.update(f"tokenbridge-vocab-{VOCAB_FORMAT}:{scheme}:{size}".encode())
    digest.update(lengths.tobytes())
    digest.update(special.tobytes())
    digest.update(flat.tobytes())
    digest.update(json.dumps(roles, sort_keys=True).encode())
    digest.update(json.dumps(sorted(overrides.items())).encode())
    digest.update(json.dumps(sorted(special_contents.items())).encode())
    return Vocab(
        name=name or getattr(tokenizer, "name_or_path", "") or "tokenizer",
        flat=flat,
        starts=starts,
        special=special,
        roles=roles,
        scheme=scheme,
        content_hash=digest.hexdigest()[:32],
        canonical_overrides=overrides,
    )


def _canonical_overrides(
    tokenizer: Any, chunks: list[bytes], special: np.ndarray
) -> dict[int, int]:
    """For byte strings several ids share, the id the tokenizer emits for those bytes alone."""
    first_id: dict[bytes, int] = {}
    groups: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(chunks):
        if not data or special[token_id]:
            continue
        if data in first_id:
            groups.setdefault(data, [first_id[data]]).append(token_id)
        else:
            first_id[data] = token_id
    overrides: dict[int, int] = {}
    for data, ids in groups.items():
        chosen = ids[0]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            # Behind a newline, so SentencePiece's dummy prefix lands on the sentinel.
            encoded = tokenizer.encode("\n" + text, add_special_tokens=False)
            if encoded and encoded[-1] in ids:
                chosen = encoded[-1]
        for token_id in ids:
            overrides[token_id] = chosen
    return overrides
