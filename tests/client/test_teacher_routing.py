"""Routing prompts to several teachers: the schedules, the prompt row's own teacher, the flags and
their validation, the same routing after a resume or across ranks, and how the client reads a
multi-teacher service's ``/v1/info``."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.client.config import TrainConfig
from tokenbridge.client.errors import TeacherConfigError, TeacherRequestError, UnknownTeacherError
from tokenbridge.client.fanout import groups_of, merge_answers
from tokenbridge.client.routing import TeacherRouter, check_teacher_name
from tokenbridge.client.teacher import (
    Completion,
    GenerateResult,
    ScoreResult,
    TeacherClientConfig,
    teacher_view,
)
from tokenbridge.client.train import (
    PromptStream,
    load_prompts,
    load_routed_prompts,
    take_routed_batch,
)
from tokenbridge.shared.configargs import add_config_arguments, config_from_args

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True)
teacher_lists = st.lists(names, min_size=1, max_size=5, unique=True)


# -- names -----------------------------------------------------------------------------------------


def test_teacher_names_are_checked_with_the_rule_in_the_message():
    for good in ("a", "math", "Qwen3.6-32B", "code_v2", "x" * 64):
        assert check_teacher_name(good) == good
    for bad in ("", "-a", ".hidden", "a b", "a/b", "x" * 65, None, 3):
        with pytest.raises(ValueError, match="1 to 64 letters"):
            check_teacher_name(bad)
    assert TeacherClientConfig(teacher="math").teacher == "math"
    with pytest.raises(ValueError, match="teacher 'a b' is not a teacher name"):
        TeacherClientConfig(teacher="a b")


# -- schedules -------------------------------------------------------------------------------------


@given(teachers=teacher_lists, step=st.integers(0, 10_000), position=st.integers(0, 10**9))
def test_round_robin_gives_step_s_the_teacher_s_mod_n(teachers, step, position):
    router = TeacherRouter(tuple(teachers))
    assert router.scheduled(step, position) == teachers[step % len(teachers)]
    # A prompt that names its teacher keeps it, whatever the schedule says.
    assert router.route(step, position, "chosen") == "chosen"


def test_no_teachers_means_the_default_for_every_unrouted_prompt():
    router = TeacherRouter()
    assert {router.scheduled(s, s * 7) for s in range(50)} == {None}
    assert router.route(3, 9, "b") == "b"
    assert TeacherRouter(schedule="mixture").route(3, 9) is None


@settings(max_examples=50)
@given(
    teachers=teacher_lists,
    seed=st.integers(-(2**40), 2**40),
    positions=st.lists(st.integers(0, 10**12), min_size=1, max_size=30),
)
def test_mixture_draws_depend_only_on_seed_and_position(teachers, seed, positions):
    router = TeacherRouter(tuple(teachers), "mixture", seed=seed)
    first = [router.scheduled(0, p) for p in positions]
    # Another order, another step, other random states consumed in between: the same draws.
    random.seed(12345)
    random.random()
    again = {p: router.scheduled(99, p) for p in reversed(positions)}
    assert first == [again[p] for p in positions]
    assert first == [TeacherRouter(tuple(teachers), "mixture", seed=seed).scheduled(5, p)
                     for p in positions]  # fmt: skip
    assert set(first) <= set(teachers)


def test_mixture_follows_the_weights_and_the_seed():
    router = TeacherRouter(("a", "b", "c"), "mixture", (1.0, 3.0, 0.0), seed=7)
    draws = Counter(router.scheduled(0, p) for p in range(8000))
    assert draws["c"] == 0  # weight 0: never drawn
    share = draws["b"] / 8000
    assert abs(share - 0.75) < 0.03, draws  # ~5 standard deviations (0.0048 each)
    uniform = Counter(TeacherRouter(("a", "b"), "mixture", seed=7).scheduled(0, p)
                      for p in range(8000))  # fmt: skip
    assert abs(uniform["a"] / 8000 - 0.5) < 0.03, uniform
    reseeded = [TeacherRouter(("a", "b"), "mixture", seed=8).scheduled(0, p) for p in range(64)]
    same_seed = [TeacherRouter(("a", "b"), "mixture", seed=7).scheduled(0, p) for p in range(64)]
    assert reseeded != same_seed  # the seed matters


@given(
    weights=st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 1e-9]), min_size=2, max_size=5),
    position=st.integers(0, 10**9),
)
def test_a_teacher_without_weight_is_never_drawn(weights, position):
    if not sum(weights) > 0:
        weights[-1] = 1.0
    teachers = tuple(f"t{i}" for i in range(len(weights)))
    chosen = TeacherRouter(teachers, "mixture", tuple(weights), seed=1).scheduled(0, position)
    assert weights[teachers.index(chosen)] > 0


# -- configuration and flags -----------------------------------------------------------------------


def test_train_config_takes_teachers_and_says_what_is_wrong():
    config = TrainConfig(teachers=["math", "code"], teacher_schedule="mixture",
                         teacher_weights=[1, 2])  # fmt: skip
    assert config.teachers == ("math", "code") and config.teacher_weights == (1, 2)
    assert TrainConfig(teachers="math").teachers == ("math",)  # not its letters
    default = TrainConfig()
    assert (default.teachers, default.teacher_schedule, default.teacher_weights,
            default.teacher_field) == ((), "round_robin", (), "teacher")  # fmt: skip
    for bad, reason in (
        ({"teachers": ("a", "a")}, "distinct"),
        ({"teachers": ("a b",)}, "teachers: teacher name 'a b'"),
        ({"teacher_schedule": "random"}, "teacher_schedule must be one of"),
        ({"teachers": ("a", "b"), "teacher_schedule": "mixture", "teacher_weights": (1.0,)},
         "one weight per teacher: 1 weights for 2"),
        ({"teachers": ("a", "b"), "teacher_weights": (1.0, 1.0)}, "only apply to .*mixture"),
        ({"teachers": ("a", "b"), "teacher_schedule": "mixture", "teacher_weights": (1.0, -1.0)},
         ">= 0"),
        ({"teachers": ("a", "b"), "teacher_schedule": "mixture", "teacher_weights": (0.0, 0.0)},
         "not all be 0"),
        ({"teachers": ("a",), "teacher_schedule": "mixture", "teacher_weights": (float("nan"),)},
         "finite"),
        ({"teacher_field": "prompt"}, "prompt's own field"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            TrainConfig(**bad)


def test_flags_are_generated_for_the_teacher_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    argv = ["--teachers", "math", "code", "--teacher-schedule", "mixture",
            "--teacher-weights", "1", "2.5", "--teacher-field", "route"]  # fmt: skip
    config = config_from_args(TrainConfig, parser.parse_args(argv), parser)
    assert config.teachers == ("math", "code")
    assert config.teacher_weights == (1.0, 2.5)
    assert (config.teacher_schedule, config.teacher_field) == ("mixture", "route")
    with pytest.raises(SystemExit):  # a usage error that says why, not a traceback
        config_from_args(
            TrainConfig, parser.parse_args(["--teachers", "a", "--teacher-weights", "1"]), parser
        )


# -- the prompts file ------------------------------------------------------------------------------


def _rows(path, *rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_keep_their_teacher_and_bad_ones_name_the_line(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    path = _rows(
        tmp_path / "p.jsonl",
        {"prompt": "one"},
        {"prompt": "two", "teacher": "code"},
        {"messages": messages, "teacher": None},
        {"prompt": "four", "teacher": "math", "route": "code"},
    )
    prompts, routes = load_routed_prompts(path)
    assert prompts == ["one", "two", messages, "four"]
    assert routes == [None, "code", None, "math"]
    assert load_prompts(path) == prompts  # the plain reader is unchanged
    assert load_routed_prompts(path, "route")[1] == [None, None, None, "code"]
    assert load_routed_prompts(path, "")[1] == [None] * 4  # routing by row turned off
    assert load_routed_prompts(path, teachers=("math", "code"))[1] == routes
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*teacher 'code', which is not among .*"
                                         r"\['math', 'other'\]"):  # fmt: skip
        load_routed_prompts(path, teachers=("math", "other"))
    _rows(path, {"prompt": "x"}, {"prompt": "y", "teacher": ["a"]})
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'teacher' \['a'\] is not a teacher name"):
        load_routed_prompts(path)
    assert load_prompts(path) == ["x", "y"]  # which the plain reader ignores
    assert load_routed_prompts(None)[1] == [None] * len(load_prompts(None))


# -- batches: ranks and resume ---------------------------------------------------------------------


def _run(router, rows, steps, batch, *, world=1, start=None, seed=5):
    """Each step's routing of every rank, as a trainer takes it; ``start`` resumes mid-run."""
    streams = [PromptStream(list(range(len(rows))), seed) for _ in range(world)]
    out = []
    for step in range(steps):
        if start is not None and step == start[0]:
            streams = [PromptStream(list(range(len(rows))), seed, position=start[1])
                       for _ in range(world)]  # fmt: skip
        if start is not None and step < start[0]:
            for stream in streams:
                stream.take_indexed(batch * world)
            out.append(None)
            continue
        out.append([take_routed_batch(s, router, rows, batch, world, r)
                    for r, s in enumerate(streams)])  # fmt: skip
    return out


@pytest.mark.parametrize("schedule", ["round_robin", "mixture"])
def test_a_resumed_run_routes_every_prompt_as_before(schedule):
    rows = [None, "b", None, None, "a", None, None]
    router = TeacherRouter(("a", "b", "c"), schedule, seed=3)
    straight = _run(router, rows, 9, 2)
    resumed = _run(router, rows, 9, 2, start=(4, 4 * 2))
    assert resumed[4:] == straight[4:]
    for step, (taken,) in enumerate(straight):
        for index, teacher, by_field in taken:
            assert by_field == (rows[index] is not None)
            if by_field:
                assert teacher == rows[index]  # the row's own teacher, always
            elif schedule == "round_robin":
                assert teacher == ("a", "b", "c")[step % 3]
    assert {t for (taken,) in straight for _, t, f in taken if not f} == {"a", "b", "c"}


def test_ranks_split_a_step_and_route_it_like_one_rank():
    rows = [None] * 5 + ["b"] * 3
    router = TeacherRouter(("a", "b"), "mixture", (3.0, 1.0), seed=11)
    single = _run(router, rows, 6, 4)
    double = _run(router, rows, 6, 2, world=2)
    for (one,), (rank0, rank1) in zip(single, double, strict=True):
        # rank r keeps the step's prompts r, r + world, ...: together the one-rank batch.
        assert one[0::2] == rank0 and one[1::2] == rank1


def test_each_teachers_answers_go_back_to_their_prompts_batch_positions():
    routes = ["b", "a", "b", "c", "a"]
    groups = groups_of(routes)
    assert groups == {"b": [0, 2], "a": [1, 4], "c": [3]}  # in order of first appearance

    def scored(name):
        # Stand-ins for ScoredSequence: merge_answers only moves them.
        rows = [f"{name}{i}" for i in groups[name]]
        usage = {"teacher_prompt_tokens": len(rows), "positions": 10}
        return ScoreResult(rows, 4, usage, {}, {"name": name}, 1, 0.0)

    merged = merge_answers(groups, {name: scored(name) for name in groups}, len(routes))
    assert merged.sequences == ["b0", "a1", "b2", "c3", "a4"] and merged.completions == []
    assert merged.usage == {"teacher_prompt_tokens": 5, "positions": 30}
    assert merged.parts["c"].sequences == ["c3"]
    samples = {
        name: GenerateResult([Completion(f"{name}{i}", [i], "stop") for i in indexes],
                             {"teacher_completion_tokens": 2}, {}, 1, 0.0)
        for name, indexes in groups.items()
    }  # fmt: skip
    merged = merge_answers(groups, samples, len(routes))
    assert [c.text for c in merged.completions] == ["b0", "a1", "b2", "c3", "a4"]
    assert merged.sequences == [] and merged.usage == {"teacher_completion_tokens": 6}


# -- the client's view of a multi-teacher service --------------------------------------------------

LIMITS = {"max_sequences": 64, "request_timeout_s": 120.0}


def _entry(name, vocab_hash, max_top_k):
    return {
        "name": name, "state": "ready", "ready": True, "model": f"/models/{name}",
        "revision": None, "backend": "transformers", "dtype": "float32", "device": "cpu",
        "versions": {}, "vocab_size": 100, "tokenizer_size": 100, "vocab_hash": vocab_hash,
        "has_chat_template": False, "flops": None, "max_top_k": max_top_k,
        "limits": {**LIMITS, "max_sequences": max_top_k},
    }  # fmt: skip


def _info(default, *entries):
    top = next((e for e in entries if e["name"] == default), None)
    return {
        "api_version": "v1",
        "state": top["state"] if top else None,
        "teacher": {k: v for k, v in top.items() if k not in ("state", "ready", "max_top_k",
                                                               "limits")} if top else None,
        "max_top_k": top["max_top_k"] if top else None,
        "limits": top["limits"] if top else None,
        "default_teacher": default,
        "teachers": list(entries),
    }  # fmt: skip


def test_the_view_describes_the_chosen_teacher():
    info = _info("math", _entry("math", "h-math", 16), _entry("code", "h-code", 32))
    code = teacher_view(info, "code")
    assert code["teacher"]["vocab_hash"] == "h-code" and code["teacher"]["name"] == "code"
    assert code["max_top_k"] == 32 and code["limits"]["max_sequences"] == 32
    assert [t["name"] for t in code["teachers"]] == ["math", "code"]  # the listing stays
    default = teacher_view(info, None)
    assert default["teacher"]["name"] == "math" and default["max_top_k"] == 16
    assert info["max_top_k"] == 16 and "name" in info["teacher"]  # the input is not changed
    only = {**_info(None, _entry("solo", "h", 8)), "default_teacher": None}
    assert teacher_view(only, None)["teacher"]["name"] == "solo"  # the only one is the default


def test_unknown_teachers_and_a_missing_default_name_those_there_are():
    info = _info(None, _entry("math", "h1", 16), _entry("code", "h2", 16))
    with pytest.raises(UnknownTeacherError, match=r"no teacher 'poetry'; it hosts \['math', "
                                                  r"'code'\]") as caught:  # fmt: skip
        teacher_view(info, "poetry", "http://t")
    assert caught.value.available == ("math", "code") and caught.value.name == "poetry"
    assert caught.value.url == "http://t" and isinstance(caught.value, TeacherConfigError)
    with pytest.raises(UnknownTeacherError, match=r"several teachers \['math', 'code'\] and none"):
        teacher_view(info, None)
    older = {"api_version": "v1", "teacher": {"vocab_hash": "h"}, "max_top_k": 8}
    assert teacher_view(older, None) == older
    with pytest.raises(UnknownTeacherError, match="one unnamed teacher") as caught:
        teacher_view(older, "math")
    assert caught.value.available == ()
    with pytest.raises(TeacherConfigError, match="not a list"):
        teacher_view({**older, "teachers": {"math": {}}}, None)
    # The same refusal met later, from score or generate, is told apart from a lost student.
    lost = TeacherRequestError(404, "unknown_teacher", "no teacher 'x' here; this service hosts []")
    assert lost.unknown_teacher and not lost.student_not_registered
    assert not TeacherRequestError(404, "not_found", "no student tokenizer 'y'").unknown_teacher
