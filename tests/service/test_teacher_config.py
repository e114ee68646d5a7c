"""Several named teachers in one service's configuration (``service/config.py``).

``--teacher NAME=PATH`` repeated through the real ``serve`` parser (a bare ``--teacher PATH`` is
the teacher ``default``), ``--teacher-options NAME.KEY=VALUE`` typed like the field it sets,
``[[teachers]]`` tables of a ``--config`` TOML file with the flags given winning, the default
teacher's rules, and every validation error with the reason in its message.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.cli import _parse_with_config_file, _subparser, build_parser
from tokenbridge.service.config import (
    DEFAULT_TEACHER,
    TEACHER_KEYS,
    TEACHER_NAME,
    ServiceConfig,
    TeacherConfig,
    TeacherSettings,
    load_config_file,
    parse_teachers,
)
from tokenbridge.shared.configargs import config_from_args

REPO = Path(__file__).resolve().parents[2]

names = st.from_regex(TEACHER_NAME.pattern, fullmatch=True)
models = st.from_regex(r"[A-Za-z0-9_./-]{1,30}", fullmatch=True)


def serve_config(argv: list[str]) -> ServiceConfig:
    """``tokenbridge serve ARGV`` parsed as the command does it (a ``--config`` file included)."""
    parser = build_parser()
    serve = _subparser(parser, "serve")
    args = _parse_with_config_file(parser, serve, ServiceConfig, ["serve", *argv])
    return config_from_args(ServiceConfig, args, serve)


def problem(**fields) -> str:
    """The message of the ``ValueError`` that ``ServiceConfig(**fields)`` raises."""
    with pytest.raises(ValueError) as caught:
        ServiceConfig(**fields)
    return str(caught.value)


# -- --teacher through the parser -----------------------------------------------------------------


def test_repeated_teacher_flags_name_each_teacher_in_order():
    config = serve_config(
        ["--teacher", "math=/models/math", "--teacher", "code=org/coder", "--max-top-k", "16"]
    )
    assert config.teacher == ("math=/models/math", "code=org/coder")
    assert config.teacher_names == ("math", "code")
    # Two teachers, neither named default and no --default-teacher: requests must name theirs.
    assert config.default_teacher_name is None
    own = config.teacher_configs()
    assert list(own) == ["math", "code"]
    assert own["math"].model == "/models/math"
    assert own["code"].model == "org/coder"
    # Each teacher's own config is a TeacherConfig with its name and the service-wide settings.
    for name, teacher in own.items():
        assert isinstance(teacher, TeacherConfig) and not isinstance(teacher, ServiceConfig)
        assert teacher.name == name and teacher.max_top_k == 16
    with pytest.raises(ValueError, match="holds 2 teachers"):
        _ = config.teacher_model


def test_a_bare_teacher_is_the_one_named_default():
    config = serve_config(["--teacher", "/models/tiny"])
    assert config.teacher_names == (DEFAULT_TEACHER,) == ("default",)
    assert config.default_teacher_name == "default"
    assert config.teacher_model == "/models/tiny"
    assert config.teacher_configs() == {
        "default": TeacherConfig(name="default", model="/models/tiny", **config.settings())
    }
    # A path with '=' whose left side is no name stays a bare path.
    odd = serve_config(["--teacher", "/models/run=3"])
    assert odd.teacher_names == ("default",) and odd.teacher_model == "/models/run=3"
    # NAME=PATH splits at the first '=' only.
    split = serve_config(["--teacher", "a=/models/run=3"])
    assert split.teacher_names == ("a",) and split.teacher_model == "/models/run=3"
    # The string form of the Python API is the same single teacher.
    assert ServiceConfig(teacher="/models/tiny").teacher == ("/models/tiny",)


def test_the_default_teacher_rules():
    # One teacher: it is the default, whatever its name.
    assert ServiceConfig(teacher=("solo=/m",)).default_teacher_name == "solo"
    # A teacher named default is the default among several.
    assert ServiceConfig(teacher=("a=/a", "/d", "b=/b")).default_teacher_name == "default"
    # --default-teacher names it; it wins over one named default.
    chosen = serve_config(["--teacher", "a=/a", "--teacher", "/d", "--default-teacher", "a"])
    assert chosen.default_teacher == "a" and chosen.default_teacher_name == "a"
    # No teacher at all: none (``serve`` refuses to start without one).
    assert ServiceConfig().teacher_names == () and ServiceConfig().default_teacher_name is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(names, models), min_size=1, max_size=5, unique_by=lambda pair: pair[0]),
    st.data(),
)
def test_any_valid_names_come_through_the_parser(teachers, data):
    argv = [arg for name, model in teachers for arg in ("--teacher", f"{name}={model}")]
    default = data.draw(st.sampled_from([None, *(name for name, _ in teachers)]))
    if default is not None:
        argv += ["--default-teacher", default]
    config = serve_config(argv)
    given_names = tuple(name for name, _ in teachers)
    assert config.teacher_names == given_names
    assert {n: c.model for n, c in config.teacher_configs().items()} == dict(teachers)
    expected = (
        default
        if default is not None
        else "default"
        if "default" in given_names
        else given_names[0]
        if len(given_names) == 1
        else None
    )
    assert config.default_teacher_name == expected


# -- --teacher-options -----------------------------------------------------------------------------


def test_teacher_options_are_typed_like_their_fields_and_stay_with_their_teacher():
    config = serve_config(
        [
            "--teacher", "a=/a", "--teacher", "b=/b", "--max-top-k", "32",
            "--teacher-options", "b.max_tokens_in_flight=5000", "b.max_request_tokens=4000",
            "--teacher-options", "b.admission_wait_s=0.25", "b.max_top_k=5",
            "--teacher-options", "b.backend=vllm", "b.devices=0,1", "b.tensor_parallel_size=2",
            "--teacher-options", "b.gpu_memory_utilization=0.45", "b.dtype=bfloat16",
        ]
    )  # fmt: skip
    assert len(config.teacher_options) == 9  # the repeated flag adds up
    a, b = config.teacher_configs()["a"], config.teacher_configs()["b"]
    assert b.max_tokens_in_flight == 5000 and type(b.max_tokens_in_flight) is int
    assert b.max_request_tokens == 4000 and b.max_top_k == 5
    assert b.admission_wait_s == 0.25 and type(b.admission_wait_s) is float
    assert b.gpu_memory_utilization == 0.45
    assert b.devices == (0, 1) and all(type(d) is int for d in b.devices)
    assert (b.backend, b.tensor_parallel_size, b.dtype) == ("vllm", 2, "bfloat16")
    # The other teacher keeps the service-wide values.
    assert (a.max_top_k, a.backend, a.devices, a.dtype) == (32, "transformers", (), "float32")
    assert a.max_tokens_in_flight == ServiceConfig().max_tokens_in_flight
    # A teacher's config holds its own settings and nothing service-wide.
    own_fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    assert own_fields == {"name", "model", *TEACHER_KEYS}
    assert not hasattr(a, "port") and not hasattr(b, "data_dir")


@settings(max_examples=60, deadline=None)
@given(
    top_k=st.integers(1, 10**6),
    wait=st.floats(0, 600, allow_nan=False),
    devices=st.lists(st.integers(0, 64), min_size=1, max_size=1),
    restarts=st.integers(0, 50),
)
def test_option_values_round_trip_through_text(top_k, wait, devices, restarts):
    options = (
        f"t.max_top_k={top_k}",
        f"t.admission_wait_s={wait!r}",
        f"t.devices={','.join(map(str, devices))}",
        f"t.engine_restarts={restarts}",
    )
    own = ServiceConfig(teacher=("t=/m",), teacher_options=options).teacher_configs()["t"]
    assert (own.max_top_k, own.admission_wait_s) == (top_k, wait)
    assert (own.devices, own.engine_restarts) == (tuple(devices), restarts)


def test_every_teacher_key_can_be_set_per_teacher():
    """Each key of TEACHER_KEYS is a ``ServiceConfig`` field an option reaches."""
    fields = {f.name for f in dataclasses.fields(ServiceConfig)}
    assert set(TEACHER_KEYS) <= fields
    values = {
        "backend": "vllm", "device": "cuda:1", "devices": "3", "dtype": "float16",
        "max_model_len": "512", "max_top_k": "7", "max_request_tokens": "900",
        "max_tokens_in_flight": "1000", "admission_wait_s": "1.5", "admission_queue": "3",
        "max_generate_tokens": "64", "batch_wait_s": "0.02", "batch_max_tokens": "777",
        "tensor_parallel_size": "1", "pipeline_parallel_size": "1",
        "gpu_memory_utilization": "0.3", "engine_restarts": "0",
        "engine_restart_backoff_s": "2.5",
    }  # fmt: skip
    assert set(values) == set(TEACHER_KEYS)
    options = tuple(f"x.{key}={value}" for key, value in values.items())
    own = ServiceConfig(teacher=("x=/m", "y=/n"), teacher_options=options).teacher_configs()
    base = ServiceConfig()
    for key, text in values.items():
        got = getattr(own["x"], key)
        expected = (int(text),) if key == "devices" else type(getattr(base, key))(text)
        if key == "devices":
            assert got == expected
        else:
            assert got == expected and type(got) is type(getattr(base, key)), key
        assert getattr(own["y"], key) == getattr(base, key), key


# -- TOML [[teachers]] ---------------------------------------------------------------------------

TEACHERS_TOML = """\
default_teacher = "small"
max_top_k = 16
teacher_options = ["big.max_top_k=4"]

[[teachers]]
name = "small"
model = "/models/small"
max_tokens_in_flight = 1000
max_request_tokens = 1000

[[teachers]]
name = "big"
model = "org/big"
backend = "vllm"
devices = [0, 1]
tensor_parallel_size = 2
gpu_memory_utilization = 0.45
"""


def test_teachers_tables_in_a_config_file(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(TEACHERS_TOML, encoding="utf-8")
    assert load_config_file(path)["teachers"][1]["devices"] == [0, 1]
    config = serve_config(["--config", str(path)])
    assert config.teacher_names == ("small", "big")
    assert config.default_teacher_name == "small"
    small, big = config.teacher_configs()["small"], config.teacher_configs()["big"]
    assert small.model == "/models/small" and big.model == "org/big"
    assert (small.max_tokens_in_flight, small.max_top_k, small.backend) == (
        1000,
        16,
        "transformers",
    )
    assert big.devices == (0, 1) and isinstance(big.devices, tuple)
    assert (big.backend, big.tensor_parallel_size, big.gpu_memory_utilization) == ("vllm", 2, 0.45)
    assert big.max_top_k == 4  # the file's teacher_options applied after its tables


def test_flags_given_win_over_the_config_file(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(TEACHERS_TOML, encoding="utf-8")
    config = serve_config(
        [
            "--config", str(path), "--max-top-k", "32", "--default-teacher", "big",
            "--teacher-options", "big.max_top_k=8", "--teacher", "extra=/models/extra",
        ]
    )  # fmt: skip
    # Flags come before the file's tables; the tables themselves have no flag and stay.
    assert config.teacher_names == ("extra", "small", "big")
    assert config.default_teacher_name == "big"
    own = config.teacher_configs()
    assert own["big"].max_top_k == 8  # the flag's option replaced the file's list
    assert config.teacher_options == ("big.max_top_k=8",)
    assert own["small"].max_top_k == 32 and own["extra"].max_top_k == 32  # the flag's default
    assert own["small"].max_tokens_in_flight == 1000  # the table's own value still holds
    assert own["extra"].model == "/models/extra"


@pytest.mark.process
def test_a_bad_config_file_fails_serve_with_the_reason(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(
        '[[teachers]]\nname = "a"\nmodel = "/a"\n[[teachers]]\nname = "a"\nmodel = "/b"\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "teachers[1]: teacher 'a' is given twice" in done.stderr


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        # Duplicate names, through flags, tables, and a bare teacher beside one named default.
        ({"teacher": ("a=/x", "a=/y")}, ["--teacher 'a=/y'", "teacher 'a' is given twice"]),
        ({"teacher": ("/x", "default=/y")}, ["teacher 'default' is given twice"]),
        (
            {"teacher": ("a=/x",), "teachers": ({"name": "a", "model": "/y"},)},
            ["teachers[0]: teacher 'a' is given twice"],
        ),
        # Bad names (tables: a flag's text before '=' that is no name is a bare path).
        ({"teachers": ({"name": "a b", "model": "/m"},)}, ["teacher name 'a b' must be 1-64"]),
        ({"teachers": ({"name": "-a", "model": "/m"},)}, ["teacher name '-a'", "starting with"]),
        ({"teachers": ({"name": "x" * 65, "model": "/m"},)}, ["1-64 letters"]),
        ({"teachers": ({"model": "/m"},)}, ["teacher name '' must be"]),
        ({"teacher": ("a=",)}, ["teacher 'a' needs a model"]),
        ({"teachers": ({"name": "a"},)}, ["teacher 'a' needs a model"]),
        ({"teachers": ("a=/m",)}, ["teachers[0] must be a table"]),
        (
            {"teachers": ({"name": "a", "model": "/m", "port": 1, "colour": "red"},)},
            ["teachers[0] has unknown keys ['colour', 'port']", "max_top_k"],
        ),
        # Options: malformed, unknown keys, service-wide keys, values of the wrong type.
        (
            {"teacher": ("a=/m",), "teacher_options": ("a.port=1",)},
            ["--teacher-options 'a.port=1'", "NAME.KEY=VALUE", "max_tokens_in_flight"],
        ),
        ({"teacher": ("a=/m",), "teacher_options": ("max_top_k=3",)}, ["NAME.KEY=VALUE"]),
        ({"teacher": ("a=/m",), "teacher_options": ("a.max_top_k",)}, ["NAME.KEY=VALUE"]),
        (
            {"teacher": ("a=/m",), "teacher_options": ("a.max_top_k=lots",)},
            ["'a.max_top_k=lots'", "max_top_k takes int; got 'lots'"],
        ),
        (
            {"teacher": ("a=/m",), "teacher_options": ("a.admission_wait_s=soon",)},
            ["admission_wait_s takes float; got 'soon'"],
        ),
        (
            {"teacher": ("a=/m",), "teacher_options": ("a.devices=0,x",)},
            ["devices takes integers like 0,1; got '0,x'"],
        ),
        # An option for a teacher that is not there names the ones that are.
        (
            {"teacher": ("a=/m", "b=/n"), "teacher_options": ("c.max_top_k=3",)},
            ["--teacher-options 'c.max_top_k=3': no teacher 'c' (teachers: ['a', 'b'])"],
        ),
        ({"teacher_options": ("c.max_top_k=3",)}, ["no teacher 'c' (teachers: none)"]),
        # A teacher's own values are validated like the service's, naming the teacher.
        (
            {"teacher": ("a=/m", "b=/n"), "teacher_options": ("b.backend=onnx",)},
            ["teacher 'b': backend must be one of", "'onnx'"],
        ),
        (
            {
                "teacher": ("a=/m", "b=/n"),
                "teacher_options": ("b.max_tokens_in_flight=5000", "b.max_request_tokens=6000"),
            },
            ["teacher 'b': max_request_tokens (6000) above max_tokens_in_flight (5000)"],
        ),
        (
            {"teacher": ("a=/m",), "teacher_options": ("a.engine_restarts=-1",)},
            ["teacher 'a': engine_restarts must be >= 0"],
        ),
        # Devices against the engine's parallel size.
        (
            {"teacher": ("a=/m", "b=/n"), "teacher_options": ("a.devices=0,1",)},
            ["teacher 'a': the transformers engine runs on one device", "(0, 1)"],
        ),
        (
            {"teacher": ("a=/m", "b=/n"), "teacher_options": ("a.backend=vllm", "a.devices=0,1")},
            ["teacher 'a': vLLM with tensor_parallel_size 1 x pipeline_parallel_size 1 needs 1"],
        ),
        (
            {
                "teacher": ("a=/m",),
                "teacher_options": ("a.backend=vllm", "a.devices=0", "a.tensor_parallel_size=2"),
            },
            ["needs 2 GPUs; devices names 1: (0,)"],
        ),
        ({"teacher": ("a=/m",), "teacher_options": ("a.devices=1,1",)}, ["lists a GPU twice"]),
        # One GPU shared by vLLM teachers whose memory shares add up past the whole GPU.
        (
            {
                "teacher": ("a=/m", "b=/n"),
                "backend": "vllm",
                "teacher_options": ("a.devices=0", "b.devices=0"),
            },
            ["GPU 0 is shared by teachers ['a', 'b']", "adds up to 1.80 > 1"],
        ),
        (
            {
                "teacher": ("a=/m", "b=/n", "c=/o"),
                "backend": "vllm",
                "devices": (2,),
                "gpu_memory_utilization": 0.4,
            },
            ["GPU 2 is shared by teachers ['a', 'b', 'c']", "1.20 > 1"],
        ),
        # The default teacher must be one of them.
        (
            {"teacher": ("a=/m", "b=/n"), "default_teacher": "c"},
            ["default_teacher 'c' is not a teacher (teachers: ['a', 'b'])"],
        ),
        ({"default_teacher": "c"}, ["default_teacher 'c' is not a teacher (teachers: none)"]),
    ],
)
def test_validation_errors_say_why(fields, needles):
    message = problem(**fields)
    for needle in needles:
        assert needle in message, (needle, message)


def test_several_teacher_problems_are_reported_together():
    message = problem(
        teacher=("a=/m", "a=/n"),
        teachers=({"name": "bad name", "model": "/m"},),
        teacher_options=("a.port=1", "zz.max_top_k=2"),
        default_teacher="nobody",
    )
    for needle in ("given twice", "'bad name'", "'a.port=1'", "no teacher 'zz'", "'nobody'"):
        assert needle in message, needle


def test_shared_gpus_within_one_gpu_are_fine():
    # vLLM shares that add up to the whole GPU, exactly.
    ok = ServiceConfig(
        teacher=("a=/m", "b=/n"),
        backend="vllm",
        devices=(0,),
        teacher_options=("a.gpu_memory_utilization=0.4", "b.gpu_memory_utilization=0.6"),
    )
    assert {n: c.devices for n, c in ok.teacher_configs().items()} == {"a": (0,), "b": (0,)}
    # Just past it is refused.
    assert "1.02 > 1" in problem(
        teacher=("a=/m", "b=/n"), backend="vllm", devices=(0,), gpu_memory_utilization=0.51
    )
    # transformers teachers hold no memory share: any number may share a GPU.
    many = ServiceConfig(teacher=("a=/m", "b=/n", "c=/o"), devices=(1,))
    assert all(c.devices == (1,) for c in many.teacher_configs().values())
    # Separate GPUs never clash, whatever the shares.
    ServiceConfig(
        teacher=("a=/m", "b=/n"), backend="vllm", teacher_options=("a.devices=0", "b.devices=1")
    )


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=70).filter(lambda name: not TEACHER_NAME.fullmatch(name)))
def test_a_table_with_any_bad_name_is_refused_naming_it(name):
    message = problem(teachers=({"name": name, "model": "/m"},))
    assert f"teacher name {name!r} must be 1-64 letters" in message


@settings(max_examples=50, deadline=None)
@given(st.lists(names, min_size=1, max_size=4, unique=True), st.integers(0, 3))
def test_any_duplicate_name_is_refused(unique_names, which):
    repeated = unique_names[which % len(unique_names)]
    entries = tuple(f"{n}=/models/{i}" for i, n in enumerate([*unique_names, repeated]))
    message = problem(teacher=entries)
    assert f"teacher {repeated!r} is given twice" in message


def test_a_bad_teacher_flag_is_a_usage_error_that_says_why(capsys):
    with pytest.raises(SystemExit) as caught:
        serve_config(
            ["--teacher", "a=/m", "--teacher", "b=/n", "--teacher-options", "b.max_top_k=lots"]
        )
    assert caught.value.code == 2
    assert "max_top_k takes int; got 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        serve_config(["--teacher", "a=/m", "--default-teacher", "b"])
    assert caught.value.code == 2
    assert "default_teacher 'b' is not a teacher (teachers: ['a'])" in capsys.readouterr().err


def test_a_smaller_admission_limit_brings_the_teachers_request_limit_down_with_it():
    """A teacher given only a smaller ``max_tokens_in_flight`` takes requests that fit in it
    (its ``max_request_tokens`` follows); the other keeps the service-wide one."""
    config = ServiceConfig(
        teacher=("a=/m", "b=/n"), teacher_options=("b.max_tokens_in_flight=5000",)
    )
    own = config.teacher_configs()
    assert (own["b"].max_tokens_in_flight, own["b"].max_request_tokens) == (5000, 5000)
    assert own["a"].max_request_tokens == config.max_request_tokens == 65536


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"max_top_k": "eight"}, "teachers[0].max_top_k = 'eight' is not an integer"),
        ({"devices": [0, True]}, "teachers[0].devices = [0, True] is not a list of GPU indices"),
        ({"gpu_memory_utilization": "half"}, "gpu_memory_utilization = 'half' is not a number"),
        ({"name": 3}, "teachers[0].name must be a string"),
    ],
)
def test_a_teachers_table_value_of_the_wrong_type_is_named(table, needle):
    with pytest.raises(ValueError) as caught:
        ServiceConfig(teachers=({"name": "a", "model": "/m", **table},))
    assert needle in str(caught.value)


def test_parse_teachers_reads_all_three_sources_over_any_defaults():
    defaults = TeacherSettings(max_top_k=8, dtype="bfloat16")
    own = parse_teachers(
        ("a=/models/a",),
        ("b.max_top_k=3", "a.devices=2"),
        ({"name": "b", "model": "org/b", "backend": "vllm"},),
        defaults,
        default_teacher="b",
    )
    assert list(own) == ["a", "b"]
    assert own["a"] == TeacherConfig(
        name="a", model="/models/a", **{**defaults.settings(), "devices": (2,)}
    )
    assert (own["b"].model, own["b"].backend, own["b"].max_top_k) == ("org/b", "vllm", 3)
    assert own["b"].dtype == "bfloat16"  # the defaults' value, not the dataclass default
    with pytest.raises(ValueError, match="default_teacher 'c' is not a teacher"):
        parse_teachers(("a=/m",), (), (), defaults, default_teacher="c")


def test_a_teacher_config_checks_itself():
    with pytest.raises(ValueError, match="teacher name 'no way'"):
        TeacherConfig(name="no way", model="/m")
    with pytest.raises(ValueError, match="max_top_k must be positive"):
        TeacherConfig(name="ok", model="/m", max_top_k=0)
    with pytest.raises(TypeError):
        TeacherConfig(name="ok", model="/m", port=80)  # type: ignore[call-arg]
