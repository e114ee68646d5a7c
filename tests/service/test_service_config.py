"""Service configuration (``service/config.py``) and the ``serve`` flags generated from it.

``ServiceConfig`` validates itself and names every bad field in one message; API keys are kept only
as hashes; TOML files give the same keys; ``tokenbridge serve`` has one flag per field.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.cli import build_parser
from tokenbridge.service.config import ServiceConfig, hash_api_key, load_config_file
from tokenbridge.shared.configargs import config_from_args

REPO = Path(__file__).resolve().parents[2]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- validation ----------------------------------------------------------------------------------


def test_defaults_are_valid():
    config = ServiceConfig()
    assert config.backend == "transformers"
    assert config.accepted_key_hashes == frozenset()
    assert isinstance(config.data_dir, Path)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"backend": "onnx"}, ["backend", "'onnx'"]),
        ({"port": 0}, ["port"]),
        ({"port": 65536}, ["port"]),
        ({"max_top_k": 0}, ["max_top_k"]),
        ({"max_model_len": -1}, ["max_model_len"]),
        ({"batch_max_tokens": 0}, ["batch_max_tokens"]),
        ({"tensor_parallel_size": 0}, ["tensor_parallel_size"]),
        (
            {"max_request_tokens": 1000, "max_tokens_in_flight": 999},
            ["max_request_tokens", "max_tokens_in_flight"],
        ),
        ({"api_keys": ("good", "")}, ["api_keys"]),
        ({"log_level": "loud"}, ["log_level", "loud"]),
        ({"request_timeout_s": 0.0}, ["request_timeout_s"]),
        ({"batch_wait_s": -0.1}, ["batch_wait_s"]),
        ({"gpu_memory_utilization": 1.5}, ["gpu_memory_utilization"]),
        ({"gpu_memory_utilization": 0.0}, ["gpu_memory_utilization"]),
    ],
)
def test_validation_errors_name_the_field(fields, named):
    with pytest.raises(ValueError) as caught:
        ServiceConfig(**fields)
    for word in named:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 1},
        {"port": 65535},
        {"backend": "vllm"},
        {"max_request_tokens": 5, "max_tokens_in_flight": 5},
        {"batch_wait_s": 0.0},
        {"gpu_memory_utilization": 1.0},
        {"log_level": "debug"},
    ],
)
def test_boundary_values_are_accepted(fields):
    config = ServiceConfig(**fields)
    for name, value in fields.items():
        assert getattr(config, name) == value


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as caught:
        ServiceConfig(backend="x", port=0, max_top_k=0, log_level="loud", api_keys=("",))
    message = str(caught.value)
    for name in ("backend", "port", "max_top_k", "log_level", "api_keys"):
        assert name in message
    assert message.count(";") >= 4


def test_data_dir_becomes_a_path_and_the_config_is_frozen():
    config = ServiceConfig(data_dir="some/where")
    assert config.data_dir == Path("some/where")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


# --- API keys ------------------------------------------------------------------------------------


def test_accepted_key_hashes_hash_plain_keys_and_keep_given_hashes():
    given_hash = sha256("other")
    config = ServiceConfig(api_keys=("secret", "s2"), api_key_hashes=(given_hash,))
    assert config.accepted_key_hashes == {sha256("secret"), sha256("s2"), given_hash}
    assert "secret" not in config.accepted_key_hashes
    assert hash_api_key("secret") == sha256("secret")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=20), max_size=4),
    st.lists(st.text(max_size=10).map(sha256), max_size=3),
)
def test_accepted_key_hashes_never_hold_a_plain_key(keys, hashes):
    config = ServiceConfig(api_keys=tuple(keys), api_key_hashes=tuple(hashes))
    accepted = config.accepted_key_hashes
    assert accepted == {sha256(k) for k in keys} | set(hashes)
    for key in keys:
        assert key not in accepted


# --- TOML files ----------------------------------------------------------------------------------


def test_load_config_file_reads_toml_and_turns_lists_into_tuples(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(
        'teacher = "Qwen/Qwen3-0.6B"\n'
        "port = 9000\n"
        "batch_wait_s = 0.01\n"
        'api_keys = ["a", "b"]\n'
        'probe_text = "naïve café 🦊"\n',
        encoding="utf-8",
    )
    values = load_config_file(path)
    assert values == {
        "teacher": "Qwen/Qwen3-0.6B",
        "port": 9000,
        "batch_wait_s": 0.01,
        "api_keys": ("a", "b"),
        "probe_text": "naïve café 🦊",
    }
    config = ServiceConfig(**values)
    assert config.api_keys == ("a", "b")
    assert load_config_file(str(path)) == values


def test_load_config_file_refuses_unknown_keys_naming_them(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('teacher = "t"\nprot = 1\n[server]\nhost = "x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="unknown keys") as caught:
        load_config_file(path)
    assert "'prot'" in str(caught.value) and "'server'" in str(caught.value)
    assert "'teacher'" not in str(caught.value).split("known:")[0]


def test_an_empty_file_sets_nothing(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert load_config_file(path) == {}


@pytest.mark.parametrize("text", ["port = ", "teacher = 'a'\nteacher = 'b'\n", "[x\n", "= 1"])
def test_load_config_file_raises_value_error_for_invalid_toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(path)


def test_load_config_file_raises_value_error_for_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(tmp_path)  # a folder


@pytest.mark.process
def test_load_config_file_reads_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('probe_text = "naïve café"\n', encoding="utf-8")
    script = (
        "import sys\n"
        "from tokenbridge.service.config import load_config_file\n"
        "print(ascii(load_config_file(sys.argv[1])['probe_text']))\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONUTF8", None)
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", script, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == ascii("naïve café")


# --- the serve command's flags -------------------------------------------------------------------


def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return parser, action.choices["serve"]
    raise AssertionError("no subcommands")


def test_serve_has_a_flag_for_every_config_field():
    _, serve = serve_parser()
    options = {option for action in serve._actions for option in action.option_strings}
    for field in dataclasses.fields(ServiceConfig):
        flag = "--" + field.name.replace("_", "-")
        # ``teachers`` ([[teachers]] tables) lives in the TOML file only.
        assert (flag in options) == field.metadata.get("cli", True), field.name
    assert "--config" in options


def test_serve_flag_help_comes_from_the_field_metadata():
    _, serve = serve_parser()
    helps = {action.dest: action.help or "" for action in serve._actions}
    for field in dataclasses.fields(ServiceConfig):
        if field.metadata.get("cli", True):
            assert field.metadata["help"] in helps[field.name], field.name


def test_serve_without_flags_gives_the_default_config():
    parser, serve = serve_parser()
    args = parser.parse_args(["serve"])
    assert config_from_args(ServiceConfig, args, serve) == ServiceConfig()


def test_serve_flags_are_typed_like_the_fields():
    parser, serve = serve_parser()
    args = parser.parse_args(
        [
            "serve",
            "--teacher",
            "t",
            "--port",
            "9001",
            "--batch-wait-s",
            "0.25",
            "--api-keys",
            "k1",
            "k2",
            "--data-dir",
            "/tmp/tb",
            "--backend",
            "vllm",
        ]
    )
    config = config_from_args(ServiceConfig, args, serve)
    assert config.port == 9001
    assert config.batch_wait_s == 0.25
    assert config.api_keys == ("k1", "k2")
    assert config.data_dir == Path("/tmp/tb")
    assert config.backend == "vllm"
    assert config.teacher == ("t",)
    assert config.teacher_names == ("default",) and config.teacher_model == "t"


def test_a_bad_flag_value_is_a_usage_error_that_says_why(capsys):
    parser, serve = serve_parser()
    args = parser.parse_args(["serve", "--port", "0", "--log-level", "loud"])
    with pytest.raises(SystemExit) as caught:
        config_from_args(ServiceConfig, args, serve)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "port" in err and "log_level" in err


def test_a_non_numeric_port_is_refused_by_the_parser(capsys):
    parser, _ = serve_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--port", "eighty"])
    assert "--port" in capsys.readouterr().err
