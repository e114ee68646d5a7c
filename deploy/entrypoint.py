#!/usr/bin/env python3
"""The trainer image's entry point: ``tokenbridge`` itself, with one difference for containers.

``tokenbridge train --resume`` refuses to start when ``OUT_DIR/checkpoint.pt`` does not exist yet.
A container is started with the same command every time, so its command always carries
``--resume``: on the first start (no checkpoint yet) this wrapper drops the flag and says so, on
every later start the run continues from its checkpoint. Everything else, every other subcommand
included, goes to ``tokenbridge`` unchanged; the flags are parsed by tokenbridge's own parser
(``--config FILE.toml`` and its ``out_dir`` included).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def checkpoint_path(argv: list[str]) -> Path:
    """Where ``tokenbridge train ARGV`` reads and writes its checkpoint."""
    from tokenbridge.cli import build_parser
    from tokenbridge.client.config import load_train_config
    from tokenbridge.client.train import CHECKPOINT

    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.config is not None and not _given(argv, "--out-dir"):
        out_dir = Path(load_train_config(args.config).get("out_dir", out_dir))
    return out_dir / CHECKPOINT


def resumable(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--resume`` when there is nothing to resume yet, and a note saying so."""
    if not argv or argv[0] != "train" or "--resume" not in argv:
        return argv, None
    checkpoint = checkpoint_path(argv)
    if checkpoint.exists():
        return argv, f"resuming from {checkpoint}"
    kept = [arg for arg in argv if arg != "--resume"]
    return kept, f"no checkpoint at {checkpoint} yet: starting a new run"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, note = resumable(argv)
    if note:
        print(f"tokenbridge-entrypoint: {note}", file=sys.stderr, flush=True)
    from tokenbridge.cli import main as tokenbridge_main

    return tokenbridge_main(argv)


if __name__ == "__main__":
    sys.exit(main())
