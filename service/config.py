"""Service configuration: a frozen dataclass, validated when built.

``tokenbridge serve`` generates its flags from ``ServiceConfig``; a TOML file (``--config``) gives
the same keys. Environment variables are read only by the command-line entry point.

One service may host several teachers (``service/teacher_config.py``). The fields ``ServiceConfig``
inherits from ``TeacherSettings`` (engine, devices, limits: ``TEACHER_KEYS``) are every teacher's
defaults; ``teacher_configs()`` gives each teacher's own ``TeacherConfig``, by name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenbridge.service.teacher_config import (
    BACKENDS,
    TEACHER_KEYS,
    TeacherConfig,
    TeacherSettings,
    parse_teachers,
)
from tokenbridge.shared.configargs import load_toml
from tokenbridge.shared.protocol import DEFAULT_TEACHER, TEACHER_NAME

__all__ = [
    "BACKENDS",
    "DEFAULT_TEACHER",
    "NO_TEACHER",
    "TEACHER_KEYS",
    "TEACHER_NAME",
    "ServiceConfig",
    "TeacherConfig",
    "TeacherSettings",
    "hash_api_key",
    "load_config_file",
    "parse_teachers",
]

#: What a service told no teacher says, wherever that is found out.
NO_TEACHER = (
    "no teacher given: pass --teacher PATH_OR_HUB (or NAME=PATH_OR_HUB, repeated), or teacher = "
    "... or [[teachers]] tables in --config"
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_api_key(key: str) -> str:
    """The stored form of an API key (keys themselves are never kept or logged)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServiceConfig(TeacherSettings):
    """Everything ``tokenbridge serve`` needs. Limits are per request unless said otherwise; the
    ``TeacherSettings`` fields are every teacher's defaults."""

    teacher: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "teacher model as NAME=PATH_OR_HUB, repeated for several teachers (a bare "
            f"PATH_OR_HUB names the teacher {DEFAULT_TEACHER!r})"
        },
    )
    teacher_options: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "one teacher's own setting as NAME.KEY=VALUE, repeated (KEY: "
            + ", ".join(TEACHER_KEYS)
            + "; devices as 0,1); the other flags are every teacher's defaults"
        },
    )
    teachers: tuple[dict[str, Any], ...] = field(
        default=(),
        metadata={
            "cli": False,
            "help": "[[teachers]] tables of the TOML file: name, model and any of TEACHER_KEYS",
        },
    )
    default_teacher: str = field(
        default="",
        metadata={
            "help": "the teacher of requests that name none (default: the one named "
            f"{DEFAULT_TEACHER!r}, else the only one; with several and none of these, requests "
            "must name theirs)"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    data_dir: Path = field(
        default=Path("tokenbridge-data"),
        metadata={"help": "registered student tokenizers and mapping tables live here"},
    )
    max_body_bytes: int = field(default=32 << 20, metadata={"help": "largest request body"})
    max_sequences: int = field(default=256, metadata={"help": "most sequences per request"})
    request_timeout_s: float = field(
        default=120.0, metadata={"help": "per-request deadline, answered 504"}
    )
    api_keys: tuple[str, ...] = field(
        default=(), repr=False, metadata={"help": "Bearer keys accepted (none: no authentication)"}
    )
    api_key_hashes: tuple[str, ...] = field(
        default=(), metadata={"help": "sha256 hex digests of accepted keys"}
    )
    key_tokens_per_minute: int = field(
        default=0,
        metadata={"help": "per-key quota: teacher tokens each API key may use a minute (0: none)"},
    )
    key_max_requests_in_flight: int = field(
        default=0,
        metadata={"help": "per-key quota: requests each API key may have in flight (0: none)"},
    )
    key_quotas: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "per-key overrides of key_tokens_per_minute, as KEY_ID=TOKENS_PER_MINUTE "
            "(KEY_ID: the key's sha256 hex or its first 8+ characters)"
        },
    )
    tokenizer_dirs: tuple[Path, ...] = field(
        default=(),
        metadata={
            "help": "folders besides data_dir that path registrations may read tokenizers from"
        },
    )
    probe_text: str = field(
        default="The quick brown fox, 1234 apples and naïve café déjà vu: 🦊!\n",
        metadata={"help": "text used to report the 1:1 share when a student registers"},
    )
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Every teacher is resolved (and checked) now, so a bad one fails the config's build.
        try:
            _ = self._teacher_configs
        except ValueError as error:
            raise ValueError(str(error)) from None

    def _normalise(self) -> None:
        super()._normalise()
        # A single model given as a string (``ServiceConfig(teacher="path")``, ``teacher = "..."``
        # in TOML) is the one teacher named ``default``.
        teacher = (self.teacher,) if isinstance(self.teacher, str) else self.teacher
        object.__setattr__(self, "teacher", tuple(t for t in teacher if t))
        object.__setattr__(self, "teacher_options", tuple(self.teacher_options))
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "tokenizer_dirs", tuple(Path(d) for d in self.tokenizer_dirs))
        object.__setattr__(self, "api_key_hashes", tuple(h.lower() for h in self.api_key_hashes))

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not 0 < self.port < 65536:
            problems.append(f"port must lie in 1..65535; got {self.port}")
        problems += [
            f"{name} must be positive"
            for name in ("max_body_bytes", "max_sequences")
            if getattr(self, name) < 1
        ]
        if self.request_timeout_s <= 0:
            problems.append(f"request_timeout_s must be positive; got {self.request_timeout_s}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            problems.append(
                f"log_level must be debug, info, warning or error; got {self.log_level}"
            )
        return problems + self._key_problems()

    def _key_problems(self) -> list[str]:
        problems = []
        if any(not key for key in self.api_keys):
            problems.append("api_keys must not be empty strings")
        if self.key_tokens_per_minute < 0 or self.key_max_requests_in_flight < 0:
            problems.append("key_tokens_per_minute and key_max_requests_in_flight must be >= 0")
        bad_hashes = [h for h in self.api_key_hashes if not _SHA256_HEX.fullmatch(h)]
        if bad_hashes:
            problems.append(
                f"api_key_hashes must be sha256 hex digests (64 of 0-9a-f); {len(bad_hashes)} "
                "are not (hash a key with: printf %s KEY | sha256sum)"
            )
            return problems
        try:
            self.key_quota_table()
        except ValueError as error:
            problems.append(str(error))
        return problems

    # -- teachers --------------------------------------------------------------------------------

    @cached_property
    def _teacher_configs(self) -> dict[str, TeacherConfig]:
        return parse_teachers(
            self.teacher, self.teacher_options, self.teachers, self, self.default_teacher
        )

    def teacher_configs(self) -> dict[str, TeacherConfig]:
        """Every teacher's own configuration, by name, in the order they were given."""
        return dict(self._teacher_configs)

    def teacher_config(self, name: str) -> TeacherConfig:
        """Teacher ``name``'s configuration; for a teacher whose engine is given ready-made (and
        so is none of the config's), the service-wide settings under that name."""
        own = self._teacher_configs.get(name)
        return own or TeacherConfig(name=name, model="", **self.settings())

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """The teachers' names, in the order they were given."""
        return tuple(self._teacher_configs)

    @property
    def default_teacher_name(self) -> str | None:
        """The teacher of requests that name none, or ``None`` when they must name one."""
        names = self.teacher_names
        if self.default_teacher:
            return self.default_teacher
        if DEFAULT_TEACHER in names:
            return DEFAULT_TEACHER
        return names[0] if len(names) == 1 else None

    @property
    def teacher_model(self) -> str:
        """The model (path or hub name) of a config that holds exactly one teacher."""
        configs = self._teacher_configs
        if len(configs) != 1:
            raise ValueError(
                f"this config holds {len(configs)} teachers; teacher_configs() gives each its own"
            )
        return next(iter(configs.values())).model

    @property
    def accepted_key_hashes(self) -> frozenset[str]:
        """Hashes of every accepted API key (plain keys are hashed here)."""
        return frozenset(self.api_key_hashes) | {hash_api_key(k) for k in self.api_keys}

    def key_quota_table(self) -> dict[str, int]:
        """Tokens per minute of every accepted key hash with a quota (``ValueError`` for an
        override that names no key, or more than one)."""
        hashes = set(self.accepted_key_hashes)
        table = {h: self.key_tokens_per_minute for h in hashes if self.key_tokens_per_minute}
        for entry in self.key_quotas:
            key_id, sep, value = entry.partition("=")
            key_id = key_id.strip().lower()
            if not sep or not value.strip().isdigit():
                raise ValueError(f"key_quotas entries are KEY_ID=TOKENS_PER_MINUTE; got {entry!r}")
            if len(key_id) < 8:
                raise ValueError(f"key_quotas: a KEY_ID needs at least 8 hex characters: {entry!r}")
            matches = [h for h in hashes if h.startswith(key_id)]
            if len(matches) != 1:
                raise ValueError(
                    f"key_quotas: {key_id!r} matches {len(matches)} configured keys; it must "
                    "match exactly one (the key's sha256 hex or a prefix of it)"
                )
            table[matches[0]] = int(value)
        return table


def load_config_file(path: Path | str) -> dict[str, Any]:
    """The ``ServiceConfig`` keys a TOML file sets (unknown keys are an error that names them)."""
    return load_toml(path, ServiceConfig)
