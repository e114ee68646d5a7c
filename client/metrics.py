"""The run's metrics: one JSON line per step in ``metrics.jsonl`` (a resumed run drops the lines
of steps its checkpoint does not hold) and, when ``tensorboard`` is installed, the same numbers
there."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


@contextlib.contextmanager
def metrics_writer(path: Path, keep_below_step: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda record: None
        return
    kept: list[str] = []
    if path.exists():
        # On resume, drop lines of steps that the checkpoint does not include.
        kept = [
            line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_below_step
        ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    board = _tensorboard(path.parent / "tensorboard")
    with path.open("w") as stream:
        for line in kept:
            stream.write(line + "\n")

        def write(record: dict[str, Any]) -> None:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            if board is not None:
                for name, value in _scalars(record):
                    if name != "step":
                        board.add_scalar(name, value, record["step"])
                board.flush()

        try:
            yield write
        finally:
            if board is not None:
                board.close()


def _scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a metrics record, nested records as ``teachers/NAME/sequences``."""
    for name, value in record.items():
        if isinstance(value, Mapping):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, int | float):
            yield prefix + name, value


def _tensorboard(folder: Path) -> Any:
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))
