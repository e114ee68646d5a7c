"""The ``tokenbridge`` command: demo, experiment, mapping-demo, tokenizers, tiny-model, serve,
train, export, plot.

Each subcommand's flags are generated from its config dataclass. ``serve`` and ``train`` also read
a TOML file (``--config``; flags given on the command line win) and one environment variable each,
to keep secrets off the command line: ``TOKENBRIDGE_API_KEYS`` (the service's accepted keys,
comma-separated) and ``TOKENBRIDGE_API_KEY`` (the key the trainer presents).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tokenbridge.client.config import TrainConfig
from tokenbridge.hub import DEFAULT_CACHE_DIR, OFFLINE_TOKENIZERS, materialise
from tokenbridge.mapping_demo import MappingDemoConfig, run_mapping_demo
from tokenbridge.service.config import NO_TEACHER, ServiceConfig
from tokenbridge.shared.configargs import add_config_arguments, config_from_args, load_toml
from tokenbridge.tinymodels import TinyModelSpec, build_tiny_model

__all__ = ["SERVE_ENGINE_FAILED", "SERVE_STARTUP_FAILED", "main"]

#: ``tokenbridge serve``'s exit status when the service did not start (uvicorn's own code).
SERVE_STARTUP_FAILED = 3
#: ``tokenbridge serve``'s exit status when its engine failed and ``engine_restarts`` were spent.
SERVE_ENGINE_FAILED = 4


def _default_cache() -> Path:
    # The one place the environment is read: entry points only.
    return Path(os.environ.get("TOKENBRIDGE_CACHE", DEFAULT_CACHE_DIR))


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="tokenbridge", description="On-policy distillation across tokenizers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="fit a tiny teacher, serve it, distil a student of another family; before/after",
    )
    _experiment_arguments(demo, default_preset="demo", default_out=Path("runs/demo"))

    experiment = commands.add_parser(
        "experiment",
        help="every distillation arm for several seeds: results table and plot against compute",
    )
    _experiment_arguments(experiment, default_preset="full", default_out=Path("runs/experiment"))

    mapping = commands.add_parser(
        "mapping-demo",
        help="map a teacher's predictions onto student tokens for real tokenizer pairs",
    )
    add_config_arguments(mapping, MappingDemoConfig)
    mapping.set_defaults(cache_dir=_default_cache())

    tokenizers = commands.add_parser(
        "tokenizers", help="list the offline tokenizers, or convert them into the cache"
    )
    tokenizers.add_argument("--materialise", action="store_true", help="convert all of them now")
    tokenizers.add_argument("--cache-dir", type=Path, default=_default_cache())

    tiny = commands.add_parser(
        "tiny-model", help="build a tiny random-init causal LM over a real tokenizer (for trials)"
    )
    tiny.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    add_config_arguments(tiny, TinyModelSpec)

    serve = commands.add_parser("serve", help="run the teacher-scoring service (FastAPI + uvicorn)")
    serve.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    add_config_arguments(serve, ServiceConfig)

    train = commands.add_parser(
        "train", help="train a student against a teacher service (on-policy distillation or SFT)"
    )
    train.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    add_config_arguments(train, TrainConfig)

    export = commands.add_parser(
        "export", help="write a training run's checkpoint as a Hugging Face model folder"
    )
    export.add_argument("run", type=Path, help="the run's out_dir (holding checkpoint.pt)")
    export.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    export.add_argument(
        "--student", default="",
        help="the student the run trained (folder or hub name), for checkpoints that name none",
    )  # fmt: skip
    export.add_argument(
        "--merge", action="store_true",
        help="a LoRA run: merge the adapters into the weights (a plain model, for vLLM)",
    )  # fmt: skip

    plot = commands.add_parser("plot", help="draw training curves (metrics.jsonl) to a PNG")
    plot.add_argument("metrics", type=Path, nargs="+", help="metrics.jsonl file(s) of runs")
    plot.add_argument("--out", type=Path, required=True, help="PNG to write")
    return parser


def _experiment_arguments(
    parser: argparse.ArgumentParser, default_preset: str, default_out: Path
) -> None:
    from tokenbridge.research.experiment import PRESETS, ExperimentConfig

    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=default_preset,
        help=f"named size the other flags refine (default {default_preset})",
    )  # fmt: skip
    add_config_arguments(parser, ExperimentConfig)
    # Flags left unset fall back to the preset (None marks "not given").
    parser.set_defaults(**{action.dest: None for action in parser._actions if action.dest
                           not in ("help", "preset")})  # fmt: skip
    parser.set_defaults(default_out=default_out)


def _experiment(args: argparse.Namespace) -> Any:
    from tokenbridge.research.experiment import ExperimentConfig, preset_config, run_experiment

    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    given.setdefault("out_dir", args.default_out)
    try:
        config = preset_config(args.preset, **given)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"tokenbridge {args.command}: {error}") from None
    from transformers.utils import logging as transformers_logging

    # The experiment loads and saves many tiny models: one line each would bury its own progress.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    return run_experiment(config, _default_cache())


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _parse_with_config_file(
    parser: argparse.ArgumentParser,
    sub: argparse.ArgumentParser,
    config_type: type,
    argv: list[str] | None,
) -> argparse.Namespace:
    """Parse ``argv`` with a TOML ``--config`` file's values as defaults: flags given win."""
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        try:
            sub.set_defaults(**load_toml(first.config, config_type))
        except ValueError as error:
            sub.error(str(error))
    return parser.parse_args(argv)


def _train(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    from tokenbridge.client.config import TrainConfig
    from tokenbridge.client.train import main as train_main

    train = _subparser(parser, "train")
    args = _parse_with_config_file(parser, train, TrainConfig, argv)
    if args.api_key is None and os.environ.get("TOKENBRIDGE_API_KEY"):
        args.api_key = os.environ["TOKENBRIDGE_API_KEY"]
    config = config_from_args(TrainConfig, args, train)
    summary = train_main(config)
    print(
        f"trained {summary.steps} steps, {summary.student_tokens} student tokens, "
        f"{summary.teacher_tokens} teacher tokens, waited on the teacher "
        f"{summary.teacher_wait_s:.1f} s of {summary.elapsed_s:.1f} s; metrics: "
        f"{summary.metrics_path}; checkpoint: {summary.checkpoint_path}"
    )
    return 0


def _serve(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    import uvicorn

    from tokenbridge.hub import load_tokenizer
    from tokenbridge.service.app import create_app
    from tokenbridge.service.logs import configure_logging

    serve = _subparser(parser, "serve")
    args = _parse_with_config_file(parser, serve, ServiceConfig, argv)
    keys = tuple(k for k in os.environ.get("TOKENBRIDGE_API_KEYS", "").split(",") if k.strip())
    if keys:
        args.api_keys = list(args.api_keys or ()) + [k.strip() for k in keys]
    config = config_from_args(ServiceConfig, args, serve)
    if not config.teacher_names:
        serve.error(NO_TEACHER)
    configure_logging(config.log_level)
    cache = _default_cache()
    app = create_app(config, tokenizer_loader=lambda name: load_tokenizer(name, cache))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,
            timeout_graceful_shutdown=int(config.request_timeout_s),
        )
    )
    service = app.state.service

    def engine_lost() -> None:
        # Every teacher's engine failed and their restarts are spent: shut down like on SIGTERM,
        # then exit non-zero so that a supervisor (systemd, Kubernetes, Docker) starts a fresh
        # process. While some teacher still serves, the process stays up for it.
        server.should_exit = True

    service.on_failed = engine_lost
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        return SERVE_STARTUP_FAILED
    if service.state == "failed":
        logging.getLogger("tokenbridge.service").critical(
            "exiting with status %d: every teacher's engine failed and could not be restarted",
            SERVE_ENGINE_FAILED,
        )
        return SERVE_ENGINE_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenbridge`` console script."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(parser, argv)
    if args.command == "train":
        return _train(parser, argv)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from tokenbridge.research.experiment import before_after_table

        result = _experiment(args)
        print()
        print(before_after_table(result.summary))
        print(f"plot: {result.plot_path}\ntable: {result.table_path}")
        return 0
    if args.command == "experiment":
        result = _experiment(args)
        print()
        print(result.table_path.read_text())
        print(f"plot: {result.plot_path}\nall curves: {result.results_json}")
        return 0
    if args.command == "mapping-demo":
        run_mapping_demo(config_from_args(MappingDemoConfig, args, parser))
        return 0
    if args.command == "export":
        from tokenbridge.client.export import export_checkpoint

        try:
            print(export_checkpoint(args.run, args.out, args.student, args.merge))
        except (FileNotFoundError, ValueError) as error:
            _subparser(parser, "export").error(str(error))
        return 0
    if args.command == "plot":
        from tokenbridge.client.plot import plot_metrics

        print(plot_metrics(args.metrics, args.out))
        return 0
    if args.command == "tiny-model":
        out = args.out
        del args.out
        model = config_from_args(TinyModelSpec, args, _subparser(parser, "tiny-model"))
        print(build_tiny_model(model, out, _default_cache()))
        return 0
    if args.command == "tokenizers":
        for name, spec in OFFLINE_TOKENIZERS.items():
            where = materialise(name, args.cache_dir) if args.materialise else "-"
            print(f"{name:<12} {spec.family:<42} {spec.package:<18} {where}")
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
