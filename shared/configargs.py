"""Command-line flags generated from frozen config dataclasses, so flags are never copied by hand.

Each field becomes ``--field-name`` with the field's type, default and the ``help`` entry of its
metadata (a field whose metadata says ``"cli": False`` gets no flag: it is set in the TOML file).
Sequence fields take one or more values, and a repeated flag adds to them (``--teacher a=X
--teacher b=Y``); values given on the command line replace those of a ``--config`` file.
``from_args`` builds the dataclass back, so its own validation (``__post_init__``) runs and a bad
value is reported as a usage error that says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["add_config_arguments", "config_from_args", "load_toml"]

ConfigT = TypeVar("ConfigT")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(options[0]) if len(options) == 1 else str
    if origin in (tuple, list):
        return (typing.get_args(annotation) or (str,))[0]
    return annotation


class _Accumulate(argparse.Action):
    """``nargs="+"`` that adds up over repeated flags, starting afresh from the default (which a
    ``--config`` file may have set): the command line replaces the file's list, never extends it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        start = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, start + list(values))


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """Add one flag per field of the dataclass ``config_type``."""
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        if not field.metadata.get("cli", True):
            continue
        annotation = hints[field.name]
        kind = _base_type(annotation)
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else None
        )
        help_text = field.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(
                _flag(field.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        is_sequence = typing.get_origin(annotation) in (tuple, list)
        parser.add_argument(
            _flag(field.name),
            type=Path if kind is Path else kind,
            nargs="+" if is_sequence else None,
            action=_Accumulate if is_sequence else "store",
            default=default,
            help=f"{help_text} (default: {default})" if help_text else f"default: {default}",
        )


def config_from_args(
    config_type: type[ConfigT], args: argparse.Namespace, parser: argparse.ArgumentParser
) -> ConfigT:
    """Build ``config_type`` from parsed flags; a validation error becomes a usage error."""
    values = {}
    for field in dataclasses.fields(config_type):  # type: ignore[arg-type]
        if not hasattr(args, field.name):  # a field without a flag that no file set
            continue
        value = getattr(args, field.name)
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    try:
        return config_type(**values)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def load_toml(path: Path | str, config_type: type) -> dict[str, Any]:
    """The fields of the dataclass ``config_type`` that a TOML file sets.

    Unknown keys are an error that names them; lists become tuples. TOML is read as UTF-8 whatever
    the locale.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            values = tomllib.load(stream)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read config file {path}: {error}") from None
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}; known: {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
