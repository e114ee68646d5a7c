"""A teacher larger than one GPU: ``serve``'s tensor and pipeline parallelism, from the command
line or a TOML file, reach the vLLM engine's arguments unchanged (no GPU needed to check that;
in the vLLM environment, vLLM's own ``AsyncEngineArgs`` accepts them too)."""

from __future__ import annotations

import pytest

from tokenbridge.cli import _parse_with_config_file, _subparser, build_parser
from tokenbridge.service.config import ServiceConfig
from tokenbridge.service.engines import build_engine
from tokenbridge.shared.configargs import config_from_args

pytestmark = pytest.mark.integration


def serve_config(argv: list[str]) -> ServiceConfig:
    parser = build_parser()
    serve = _subparser(parser, "serve")
    args = _parse_with_config_file(parser, serve, ServiceConfig, ["serve", *argv])
    return config_from_args(ServiceConfig, args, serve)


def test_flags_reach_the_vllm_engine_arguments(teacher_dir):
    config = serve_config(
        [
            "--teacher", str(teacher_dir), "--backend", "vllm", "--tensor-parallel-size", "4",
            "--pipeline-parallel-size", "2", "--gpu-memory-utilization", "0.85",
        ]
    )  # fmt: skip
    # Reads the tokenizer and config only; nothing starts.
    engine = build_engine(config.teacher_configs()["default"])
    args = engine._engine_args
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (4, 2)
    assert args["gpu_memory_utilization"] == 0.85
    assert args["trust_remote_code"] is False and args["enable_prefix_caching"] is False


@pytest.mark.vllm
def test_vllm_accepts_the_engine_arguments(teacher_dir):
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    config = ServiceConfig(
        teacher=str(teacher_dir), backend="vllm", tensor_parallel_size=4, pipeline_parallel_size=2
    )
    engine = build_engine(config.teacher_configs()["default"])
    built = arg_utils.AsyncEngineArgs(**engine._engine_args)
    assert (built.tensor_parallel_size, built.pipeline_parallel_size) == (4, 2)
    assert built.trust_remote_code is False


def test_a_config_file_sets_them_and_flags_win(teacher_dir, tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text(
        f'teacher = "{teacher_dir}"\nbackend = "vllm"\n'
        "tensor_parallel_size = 8\npipeline_parallel_size = 2\n"
    )
    from_file_config = serve_config(["--config", str(toml)]).teacher_configs()["default"]
    from_file = build_engine(from_file_config)._engine_args
    assert (from_file["tensor_parallel_size"], from_file["pipeline_parallel_size"]) == (8, 2)
    overridden = serve_config(["--config", str(toml), "--pipeline-parallel-size", "1"])
    assert (overridden.tensor_parallel_size, overridden.pipeline_parallel_size) == (8, 1)


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_a_parallel_size_below_one_is_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as exited:
        serve_config(["--teacher", "x", flag, "0"])
    assert exited.value.code == 2
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err
