"""The experiment's task: addition with worked steps, scored by exact answer.

``47+85=`` is answered `` 7+5=12, 4+8+1=13, so 132.``: the columns from the right, each with its
carry, then the sum. Tokenizer families cut these digits very differently (GPT-2 keeps ``47`` and
``132`` whole and splits ``933`` as ``9|33``; Llama-2/Mistral SentencePiece spells every digit),
which is where text-level cross-tokenizer methods lose the teacher's signal. The metric is crisp:
the share of held-out problems whose stated sum is right.

Pure apart from the model helpers at the end (which run a model, never the network).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Problem",
    "accuracy",
    "bits_per_byte",
    "continuation_ids",
    "corrupt",
    "corrupted_example",
    "parse_answer",
    "split_problems",
    "student_example",
]

_ANSWER = re.compile(r"so (-?\d+)\.")


@dataclass(frozen=True)
class Problem:
    """``a + b`` with its prompt, its worked solution and its answer."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        """What the model is given."""
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> int:
        """The right sum."""
        return self.a + self.b

    @property
    def solution(self) -> str:
        """The worked completion: one ``x+y[+carry]=s`` per column, right to left, then the sum."""
        digits_a = [int(c) for c in reversed(str(self.a))]
        digits_b = [int(c) for c in reversed(str(self.b))]
        steps, carry = [], 0
        for column in range(max(len(digits_a), len(digits_b))):
            terms = [
                digits_a[column] if column < len(digits_a) else 0,
                digits_b[column] if column < len(digits_b) else 0,
            ]
            if carry:
                terms.append(carry)
            total = sum(terms)
            steps.append("+".join(map(str, terms)) + f"={total}")
            carry = total // 10
        return " " + ", ".join(steps) + f", so {self.answer}."


def corrupt(problem: Problem, rng: random.Random) -> tuple[str, str]:
    """``problem``'s solution with one digit of its worked steps made wrong: (the prefix up to and
    including the wrong digit, the correct rest of the solution).

    A model fitted on these, with loss on the rest only, learns what a real LLM knows off its own
    traces: after a mistake the right next step, and the right answer, still follow.
    """
    solution = problem.solution
    steps_end = solution.index(", so")
    digits = [i for i, char in enumerate(solution[:steps_end]) if char.isdigit()]
    at = rng.choice(digits)
    wrong = rng.choice([d for d in "0123456789" if d != solution[at]])
    return solution[:at] + wrong, solution[at + 1 :]


def parse_answer(completion: str) -> int | None:
    """The sum a completion states (``..., so N.``), or None when it states none."""
    match = _ANSWER.search(completion)
    return int(match.group(1)) if match else None


def split_problems(
    digits: int, held_out: int, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """Every ``a + b`` with ``digits``-digit operands, shuffled by ``seed``: (train, held out).

    The held-out problems are never trained on, by the teacher or by any student.
    """
    if digits < 1:
        raise ValueError("digits must be at least 1")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits
    problems = [Problem(a, b) for a in range(low, high) for b in range(low, high)]
    if not 0 < held_out < len(problems):
        raise ValueError(f"held_out must lie in (0, {len(problems)}); got {held_out}")
    random.Random(seed).shuffle(problems)
    return problems[held_out:], problems[:held_out]


# -- model helpers ---------------------------------------------------------------------------------

_VOCABS: dict[int, tuple[Any, Any]] = {}


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids that spell exactly ``text`` after earlier text (``shared.align.encode_continuation``;
    the tokenizer's byte table is built once and kept)."""
    from tokenbridge.shared.align import encode_continuation
    from tokenbridge.shared.vocab import build_vocab

    held = _VOCABS.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = _VOCABS[id(tokenizer)] = (tokenizer, build_vocab(tokenizer))
    return encode_continuation(tokenizer, held[1], text)


def student_example(tokenizer: Any, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``problem`` for a model of ``tokenizer``, cut exactly as
    the trainer cuts a teacher-written completion: the prompt with the tokenizer's own special
    tokens, the completion spelling exactly its bytes after the prompt (no SentencePiece dummy
    space) and closed by end-of-sequence."""
    from tokenbridge.client.rollout import render_student_prompt

    prompt_ids = render_student_prompt(tokenizer, problem.prompt)
    completion_ids = continuation_ids(tokenizer, problem.solution)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def corrupted_example(
    tokenizer: Any, problem: Problem, rng: random.Random
) -> tuple[list[int], list[int], int]:
    """``student_example`` of a solution with one wrong digit (``corrupt``), and the index of the
    first completion token that starts after the wrong digit: the loss covers only those (the
    correct rest), never the mistake."""
    from tokenbridge.client.rollout import render_student_prompt
    from tokenbridge.shared.align import token_widths

    prefix, rest = corrupt(problem, rng)
    prompt_ids = render_student_prompt(tokenizer, problem.prompt)
    completion_ids = continuation_ids(tokenizer, prefix + rest)
    vocab = _VOCABS[id(tokenizer)][1]
    widths = token_widths(vocab, np.asarray(completion_ids, dtype=np.int64))
    ends = np.cumsum(widths)
    starts = ends - widths
    loss_from = int(np.searchsorted(starts, len(prefix.encode("utf-8")), side="left"))
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids, loss_from


def accuracy(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    max_new_tokens: int,
    batch: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> float:
    """Share of ``problems`` whose completion states the right sum: greedy by default, else
    sampled at ``temperature`` (seeded; the caller's random state is left as it was)."""
    import torch

    from tokenbridge.client.rollout import sample

    right = 0
    state = torch.get_rng_state()
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        rollout = sample(
            model, tokenizer, [p.prompt for p in chunk], max_new_tokens=max_new_tokens,
            temperature=temperature, generator_seed=seed + start if temperature > 0 else None,
        )  # fmt: skip
        for problem, ids in zip(chunk, rollout.completion_ids, strict=True):
            stated = parse_answer(tokenizer.decode(ids, skip_special_tokens=True))
            right += stated == problem.answer
    torch.set_rng_state(state)
    return right / max(1, len(problems))


def bits_per_byte(
    model: Any, tokenizer: Any, prompts: list[str], texts: list[str], with_error: bool = False
) -> Any:
    """Bits per UTF-8 byte of ``texts`` (each the completion of its prompt) under ``model``: a
    measure that does not depend on how the model's tokenizer cuts the text. With ``with_error``,
    ``(bits, standard error over the texts)``."""
    import torch

    from tokenbridge.client.rollout import completion_logprobs, render_student_prompt

    prompt_ids = [render_student_prompt(tokenizer, p) for p in prompts]
    completions = [continuation_ids(tokenizer, t) or [0] for t in texts]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logprobs_BT, mask_BT, _ = completion_logprobs(model, prompt_ids, completions)
    finally:
        if was_training:
            model.train()
    nats_B = -(logprobs_BT * mask_BT).sum(dim=1).double()
    bytes_B = [len(t.encode("utf-8")) for t in texts]
    bits = float(nats_B.sum()) / math.log(2) / max(1, sum(bytes_B))
    if not with_error:
        return bits
    from tokenbridge.client.train import ratio_standard_error

    pairs = [(float(n) / math.log(2), b) for n, b in zip(nats_B.tolist(), bytes_B, strict=True)]
    return bits, ratio_standard_error(pairs)
