"""The arithmetic task: worked solutions, answers, splits, and how examples are cut into tokens."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbridge.client.rollout import render_student_prompt
from tokenbridge.research.task import Problem, parse_answer, split_problems, student_example

operands = st.integers(min_value=0, max_value=99_999)


@given(operands, operands)
def test_the_worked_solution_states_the_sum_and_each_column_adds_up(a, b):
    problem = Problem(a, b)
    assert parse_answer(problem.solution) == a + b
    steps = re.findall(r"([\d+]+)=(\d+)", problem.solution)
    assert len(steps) == max(len(str(a)), len(str(b)))
    carry = 0
    for column, (terms, total) in enumerate(steps):
        values = [int(t) for t in terms.split("+")]
        assert sum(values) == int(total)
        digit_a = int(str(a)[::-1][column]) if column < len(str(a)) else 0
        digit_b = int(str(b)[::-1][column]) if column < len(str(b)) else 0
        assert values == [digit_a, digit_b] + ([carry] if carry else [])
        carry = int(total) // 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" 7+5=12, 4+8+1=13, so 132.", 132), ("so 7", None), ("", None), ("so -3.", -3),
     ("junk so 12. so 13.", 12)],
)  # fmt: skip
def test_parse_answer_takes_the_first_stated_sum(text, expected):
    assert parse_answer(text) == expected


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_problems(2, 50, seed=3)
    again_train, again_held = split_problems(2, 50, seed=3)
    assert (train, held) == (again_train, again_held)
    assert len(held) == 50 and len(train) + len(held) == 90 * 90
    assert not set(train) & set(held)
    assert all(10 <= p.a < 100 and 10 <= p.b < 100 for p in train + held)
    assert split_problems(2, 50, seed=4)[1] != held


@pytest.mark.parametrize(("digits", "held_out"), [(0, 5), (1, 0), (1, 100)])
def test_split_refuses_impossible_requests(digits, held_out):
    with pytest.raises(ValueError):
        split_problems(digits, held_out)


@pytest.mark.parametrize("name", ["gpt2", "mistral-v1"])
def test_student_example_cuts_like_the_trainer(bank, name):
    tokenizer = bank.tokenizer(name)
    problem = Problem(47, 85)
    prompt_ids, completion_ids = student_example(tokenizer, problem)
    assert prompt_ids == render_student_prompt(tokenizer, problem.prompt)
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]).strip() == problem.solution.strip()


@given(st.integers(10, 99), st.integers(10, 99), st.integers(0, 2**32))
def test_a_corrupted_solution_has_one_wrong_digit_in_its_steps_and_the_right_rest(a, b, seed):
    import random

    from tokenbridge.research.task import corrupt

    problem = Problem(a, b)
    prefix, rest = corrupt(problem, random.Random(seed))
    solution = problem.solution
    assert len(prefix) + len(rest) == len(solution)
    assert solution.endswith(rest) and solution.startswith(prefix[:-1])
    assert prefix[-1].isdigit() and prefix[-1] != solution[len(prefix) - 1]
    assert len(prefix) <= solution.index(", so")  # the planted error sits in the steps


@pytest.mark.parametrize("name", ["gpt2", "mistral-v1"])
def test_a_corrupted_example_puts_its_loss_only_after_the_wrong_digit(bank, name):
    import random

    from tokenbridge.research.task import corrupt, corrupted_example

    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    for index in range(30):
        problem = Problem(10 + index * 3, 97 - index * 2)
        prompt_ids, completion_ids, loss_from = corrupted_example(
            tokenizer, problem, random.Random(index)
        )
        prefix, rest = corrupt(problem, random.Random(index))
        assert prompt_ids == render_student_prompt(tokenizer, problem.prompt)
        spelled = b"".join(vocab.token_bytes[i] for i in completion_ids)
        assert spelled == (prefix + rest).encode()
        # Every trained token lies wholly in the correct rest; the first one starts right at
        # or after the end of the wrong digit, and nothing before it is trained.
        before = b"".join(vocab.token_bytes[i] for i in completion_ids[:loss_from])
        assert len(before) >= len(prefix.encode())
        assert len(b"".join(vocab.token_bytes[i] for i in completion_ids[: loss_from - 1])) < len(
            prefix.encode()
        )
        assert completion_ids[-1] == tokenizer.eos_token_id
