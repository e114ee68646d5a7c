"""Reading a conversation back out of a student's token ids, so the teacher can see it in its own
chat template (the vLLM-compatible face, ``docs/vllm-face.md``).

The student's template is learned from the template itself: each conversation shape (an optional
system message, then user and assistant turns, ending on a user turn with the generation prompt)
is rendered with placeholder contents, and the rendering becomes a byte pattern whose literal
parts are the template's markers and whose groups are the contents. The ids' bytes (special
tokens as their text) are matched against the shapes with the most turns first; what follows the
generation prompt is the reply being scored. Nothing is guessed: the conversation read must render
back, through the student's template, to exactly the ids before the reply; a sequence that no
shape matches so, or whose reply does not start on a token boundary, is left to the role-matched
path.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np

from tokenbridge.shared.vocab import Vocab

__all__ = ["Conversation", "TemplateReader", "template_reader"]

#: The most user turns a recognised conversation may hold.
MAX_TURNS = 8
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_BYTES = re.compile("\ue000[0-9]+\ue001".encode())


@dataclass(frozen=True)
class Conversation:
    """The turns before the reply, and where the reply starts in the ids."""

    messages: list[dict[str, str]]
    reply_start: int


def _roles(turns: int, system: bool) -> list[str]:
    roles = ["system"] if system else []
    for turn in range(turns):
        roles.append("user")
        if turn < turns - 1:
            roles.append("assistant")
    return roles


class TemplateReader:
    """Recognises one student tokenizer's chat template in its ids."""

    def __init__(self, tokenizer: Any, vocab: Vocab) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self._special_bytes: dict[int, bytes] = {}
        #: The texts of the student's special tokens: no message content holds one.
        markers = [self._bytes(int(token_id)) for token_id in np.flatnonzero(vocab.special)]
        self.markers = [marker for marker in markers if marker]
        #: Those a reply never holds: all but its own end (EOS, end of turn) and padding.
        ends = {self._bytes(t) for r, t in vocab.roles.items() if r != "bos" and t is not None}
        self.turn_markers = [marker for marker in self.markers if marker not in ends]
        self.shapes: list[tuple[list[str], re.Pattern[bytes]]] = []
        self.shapes = self._shapes()

    def _shapes(self) -> list[tuple[list[str], re.Pattern[bytes]]]:
        """Each conversation shape the template renders, most turns first, with its pattern."""
        shapes = []
        for turns in range(MAX_TURNS, 0, -1):
            for system in (True, False):
                roles = _roles(turns, system)
                messages = [
                    {"role": role, "content": _PLACEHOLDER.format(index)}
                    for index, role in enumerate(roles)
                ]
                try:
                    text = self.tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                except Exception:  # a template that refuses the shape (no system role...)
                    continue
                rendered = str(text).encode("utf-8")
                if len(_PLACEHOLDER_BYTES.findall(rendered)) != len(roles):
                    continue  # the template dropped or repeated a content: not readable
                literals = _PLACEHOLDER_BYTES.split(rendered)
                # A content never holds a piece of the template between contents: each group
                # then ends at the first such piece, so a match is unambiguous and linear (no
                # backtracking over the turns of a long conversation).
                between = sorted({part for part in literals[1:] if part}, key=len, reverse=True)
                stop = b"|".join(re.escape(part) for part in between)
                content = b"((?:(?!" + stop + b").)*?)" if between else b"(.*?)"
                pattern = content.join(re.escape(part) for part in literals) + b"(.*)"
                shapes.append((roles, re.compile(pattern, re.DOTALL)))
        return shapes if self._reads_back(shapes) else []

    def _reads_back(self, shapes: list[tuple[list[str], re.Pattern[bytes]]]) -> bool:
        """Whether the template's own rendering of a probe conversation reads back exactly (a
        template whose markers merge with the contents does not: its reader stays off)."""
        probe = [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5."},
            {"role": "user", "content": "And 4+4?"},
        ]
        ids = self._renders(probe)
        if not shapes or ids is None:
            return False
        self.shapes = shapes
        read = self.read(ids)
        return read is not None and read.messages == probe and read.reply_start == len(ids)

    def _bytes(self, token_id: int) -> bytes:
        if not self.vocab.special[token_id]:
            return self.vocab.token_bytes[token_id]
        found = self._special_bytes.get(token_id)
        if found is None:
            found = str(self.tokenizer.convert_ids_to_tokens(token_id)).encode("utf-8")
            self._special_bytes[token_id] = found
        return found

    def read(self, ids: list[int]) -> Conversation | None:
        """The conversation ``ids`` render, if a shape of the template matches them exactly and
        the reply starts on a token boundary; else ``None``."""
        if not self.shapes:
            return None
        pieces = [self._bytes(token_id) for token_id in ids]
        text = b"".join(pieces)
        for roles, pattern in self.shapes:
            match = pattern.fullmatch(text)
            if match is None:
                continue
            reply_at = match.start(len(roles) + 1)
            offsets = list(itertools.accumulate((len(piece) for piece in pieces), initial=0))
            if reply_at not in offsets:
                return None  # the reply's first byte is inside a token
            start = offsets.index(reply_at)
            groups = [match.group(i + 1) for i in range(len(roles))]
            if any(marker in group for group in groups for marker in self.markers):
                continue  # a content swallowed the template's markers: another shape, or none
            if any(marker in match.group(len(roles) + 1) for marker in self.turn_markers):
                return None  # the "reply" holds further turns: more than the shapes can hold
            try:
                contents = [group.decode("utf-8") for group in groups]
            except UnicodeDecodeError:
                return None
            # The bytes of a SentencePiece token after a special carry the dummy prefix's space,
            # which the text did not: try the contents as read, then without that space, and keep
            # what the template renders back to exactly these ids.
            for variant in (contents, [_drop_dummy_space(c) for c in contents]):
                messages = [
                    {"role": role, "content": content}
                    for role, content in zip(roles, variant, strict=True)
                ]
                if self._renders(messages) == list(ids[:start]):
                    return Conversation(messages, start)
            return None
        return None

    def _renders(self, messages: list[dict[str, str]]) -> list[int] | None:
        """The ids the template gives ``messages`` with the generation prompt."""
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception:
            return None
        if hasattr(rendered, "keys"):  # a BatchEncoding
            rendered = rendered["input_ids"]
        return [int(token_id) for token_id in rendered]


def _drop_dummy_space(content: str) -> str:
    return content[1:] if content.startswith(" ") else content


_READERS: OrderedDict[str, TemplateReader | None] = OrderedDict()
_READERS_LOCK = Lock()
_KEEP = 64


def template_reader(key: str, tokenizer: Any, vocab: Vocab) -> TemplateReader | None:
    """The reader of a student (by ``key``, its registration id), built once; ``None`` for a
    tokenizer without a chat template."""
    with _READERS_LOCK:
        if key in _READERS:
            _READERS.move_to_end(key)
            return _READERS[key]
    reader = TemplateReader(tokenizer, vocab) if getattr(tokenizer, "chat_template", None) else None
    with _READERS_LOCK:
        _READERS[key] = reader
        while len(_READERS) > _KEEP:
            _READERS.popitem(last=False)
    return reader
