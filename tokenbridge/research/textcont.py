"""A second task: continuing real text (Shakespeare), measured in held-out bits per byte.

Unlike the arithmetic task, whose teacher is nearly certain of each next step, a language model's
next-token distribution over prose is wide: the information is in the whole distribution, not its
argmax, which is what token-level distillation claims to transfer and what SFT on one sampled
continuation cannot. Passages come from whole plays of the ``shakespeare`` package (MIT); the
held-out plays are never trained on by any model. Whitespace is collapsed to single spaces, so
the models spend their capacity on words, not on the editions' indentation.

Pure apart from reading the corpus files and ``text_quality`` at the end (which runs a model).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenbridge.corpus import shakespeare_dir

__all__ = [
    "HELD_OUT_PLAYS",
    "SPLITS",
    "VALIDATION_PLAYS",
    "Passage",
    "examples",
    "passages",
    "plays",
    "split_of",
    "text_quality",
]

#: Plays no model trains on: the final numbers read these only.
HELD_OUT_PLAYS = ("macbeth_gut", "tempest_gut", "twelfth_night_gut")
#: A play no model trains on either, that chooses learning rates (never the held-out ones).
VALIDATION_PLAYS = ("julius_caesar_gut",)
SPLITS = ("train", "validation", "held_out")


@dataclass(frozen=True)
class Passage:
    """A prompt (the start of a passage) and the text that really follows it."""

    prompt: str
    continuation: str


@functools.cache
def plays() -> Mapping[str, str]:
    """Every play of the corpus, one edition each (the ``_gut`` files; the ``_gut_f`` ones are
    other editions of the same plays), whitespace collapsed, by file stem. Read once per process
    (every split and every call of ``passages`` reads the same 11 MB)."""
    folder = shakespeare_dir()
    return {
        path.stem: " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for path in sorted(folder.glob("*_gut.txt"))
    }


def _cut_at_space(text: str, start: int, length: int) -> int:
    """The end of a piece of about ``length`` characters from ``start``, moved back to a space."""
    end = min(len(text), start + length)
    space = text.rfind(" ", start + length // 2, end)
    return space if space > start else end


def split_of(play: str) -> str:
    """The split a play belongs to: ``held_out``, ``validation`` or ``train``."""
    if play in HELD_OUT_PLAYS:
        return "held_out"
    return "validation" if play in VALIDATION_PLAYS else "train"


def passages(
    split: str,
    count: int,
    seed: int = 0,
    prompt_chars: int = 96,
    continuation_chars: int = 128,
) -> list[Passage]:
    """``count`` passages drawn (seeded) from the plays of ``split`` (``SPLITS``): a prompt of
    about ``prompt_chars`` characters starting at a word and ending at a space, and the
    ``continuation_chars`` or so that follow it (starting with that space, as a model writes)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    texts = [t for name, t in plays().items() if split_of(name) == split]
    if not texts:
        raise RuntimeError("the Shakespeare corpus holds none of the plays this task needs")
    rng = random.Random(seed)
    out: list[Passage] = []
    span = prompt_chars + continuation_chars + 2
    while len(out) < count:
        text = rng.choice(texts)
        start = text.find(" ", rng.randrange(max(1, len(text) - span))) + 1
        middle = _cut_at_space(text, start, prompt_chars)
        end = _cut_at_space(text, middle + 1, continuation_chars)
        prompt, continuation = text[start:middle], text[middle:end]
        if prompt.strip() and continuation.strip():
            out.append(Passage(prompt, continuation))
    return out


def examples(tokenizer: Any, chosen: list[Passage]) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, continuation ids, 0) per passage, cut as the trainer cuts a completion: the
    prompt with the tokenizer's specials, the continuation spelling exactly its bytes after it
    (no end-of-sequence: a passage is cut, not finished). The loss covers the continuation."""
    from tokenbridge.client.rollout import render_student_prompt
    from tokenbridge.research.task import continuation_ids

    return [
        (render_student_prompt(tokenizer, p.prompt), continuation_ids(tokenizer, p.continuation), 0)
        for p in chosen
    ]


def text_quality(model: Any, tokenizer: Any, chosen: list[Passage]) -> dict[str, float]:
    """How well ``model`` predicts the real continuations of ``chosen``: bits per UTF-8 byte
    (with its standard error over the passages) and the share of their tokens it ranks first
    (with the binomial standard error). Runs the model; the caller's mode is restored."""
    import math

    import torch

    from tokenbridge.client.rollout import completion_logprobs, render_student_prompt
    from tokenbridge.research.task import bits_per_byte, continuation_ids

    bits, bits_se = bits_per_byte(
        model, tokenizer, [p.prompt for p in chosen], [p.continuation for p in chosen],
        with_error=True,
    )  # fmt: skip
    prompt_ids = [render_student_prompt(tokenizer, p.prompt) for p in chosen]
    targets = [continuation_ids(tokenizer, p.continuation) for p in chosen]
    right = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(chosen), 50):
                batch = targets[start : start + 50]
                _, _, full_BTV = completion_logprobs(
                    model, prompt_ids[start : start + 50], batch, full=True
                )
                assert full_BTV is not None
                best_BT = full_BTV.argmax(dim=-1)
                for b, ids in enumerate(batch):
                    right += int((best_BT[b, : len(ids)] == torch.tensor(ids)).sum())
                    total += len(ids)
    finally:
        if was_training:
            model.train()
    share = right / max(1, total)
    return {
        "bits_per_byte": bits,
        "bits_per_byte_se": bits_se,
        "next_token_accuracy": share,
        "next_token_accuracy_se": math.sqrt(share * (1 - share) / max(1, total)),
    }
