"""Service configuration: one frozen dataclass, validated when built.

``tokenbridge serve`` generates its flags from ``ServiceConfig``; a TOML file (``--config``) gives
the same keys. Environment variables are read only by the command-line entry point.

One service may host several teachers. Each is named: ``--teacher NAME=PATH_OR_HUB`` (repeated; a
bare ``--teacher PATH_OR_HUB`` names it ``default``) or a ``[[teachers]]`` table of the TOML file.
The engine, device and limit fields below (``TEACHER_KEYS``) are every teacher's defaults; a
teacher overrides them with ``--teacher-options NAME.KEY=VALUE`` or keys of its table.
``teacher_configs()`` gives each teacher's own resolved ``ServiceConfig``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tokenbridge.shared.configargs import load_toml
from tokenbridge.shared.protocol import DEFAULT_TEACHER, TEACHER_NAME

__all__ = [
    "BACKENDS",
    "DEFAULT_TEACHER",
    "TEACHER_KEYS",
    "TEACHER_NAME",
    "ServiceConfig",
    "hash_api_key",
    "load_config_file",
]

BACKENDS = ("transformers", "vllm")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Fields each teacher may set for itself; the service-wide values are their defaults.
TEACHER_KEYS = (
    "backend", "device", "devices", "dtype", "max_model_len", "max_top_k", "max_request_tokens",
    "max_tokens_in_flight", "admission_wait_s", "admission_queue", "max_generate_tokens",
    "batch_wait_s", "batch_max_tokens", "tensor_parallel_size", "pipeline_parallel_size",
    "gpu_memory_utilization", "engine_restarts", "engine_restart_backoff_s",
)  # fmt: skip


def hash_api_key(key: str) -> str:
    """The stored form of an API key (keys themselves are never kept or logged)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``tokenbridge serve`` needs. Limits are per request unless said otherwise."""

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
    backend: str = field(default="transformers", metadata={"help": "engine: transformers | vllm"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    data_dir: Path = field(
        default=Path("tokenbridge-data"),
        metadata={"help": "registered student tokenizers and mapping tables live here"},
    )
    device: str = field(default="cpu", metadata={"help": "transformers engine device"})
    devices: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "GPU indices the teacher runs on (its engine sees only these: "
            "CUDA_VISIBLE_DEVICES); vLLM needs tensor x pipeline parallel size of them, "
            "transformers one (none: leave the devices as the process found them)"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "teacher weights dtype"})
    max_top_k: int = field(default=64, metadata={"help": "largest top_k a request may ask"})
    max_model_len: int = field(
        default=2048, metadata={"help": "longest teacher sequence (prompt + completion)"}
    )
    max_body_bytes: int = field(default=32 << 20, metadata={"help": "largest request body"})
    max_sequences: int = field(default=256, metadata={"help": "most sequences per request"})
    max_request_tokens: int = field(
        default=65536, metadata={"help": "most teacher tokens per request"}
    )
    max_tokens_in_flight: int = field(
        default=262144, metadata={"help": "admission limit: teacher tokens being served at once"}
    )
    admission_wait_s: float = field(
        default=5.0,
        metadata={
            "help": "longest a request waits in line for room under max_tokens_in_flight before "
            "it is refused with 429 (0: refuse at once)"
        },
    )
    admission_queue: int = field(
        default=256, metadata={"help": "most requests waiting in line for room at once"}
    )
    max_generate_tokens: int = field(
        default=1024, metadata={"help": "largest max_tokens of a generate request"}
    )
    request_timeout_s: float = field(
        default=120.0, metadata={"help": "per-request deadline, answered 504"}
    )
    batch_wait_s: float = field(
        default=0.005, metadata={"help": "transformers batcher: longest wait for a batch to fill"}
    )
    batch_max_tokens: int = field(
        default=8192, metadata={"help": "transformers batcher: most tokens per forward pass"}
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
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "vLLM pipeline parallelism"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM memory share"})
    probe_text: str = field(
        default="The quick brown fox, 1234 apples and naïve café déjà vu: 🦊!\n",
        metadata={"help": "text used to report the 1:1 share when a student registers"},
    )
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})
    engine_restarts: int = field(
        default=3,
        metadata={
            "help": "times in a row a failed engine (died, out of memory) is restarted before "
            "the service gives up and the process exits non-zero (0: never restart)"
        },
    )
    engine_restart_backoff_s: float = field(
        default=1.0,
        metadata={"help": "wait before restarting a failed engine; doubles each time in a row"},
    )

    def __post_init__(self) -> None:
        # A single model given as a string (``ServiceConfig(teacher="path")``, ``teacher = "..."``
        # in TOML) is the one teacher named ``default``.
        if isinstance(self.teacher, str):
            object.__setattr__(self, "teacher", (self.teacher,) if self.teacher else ())
        object.__setattr__(self, "teacher", tuple(self.teacher))
        object.__setattr__(self, "teacher_options", tuple(self.teacher_options))
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "devices", tuple(self.devices))
        problems: list[str] = []
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        if not 0 < self.port < 65536:
            problems.append(f"port must lie in 1..65535; got {self.port}")
        positive = (
            "max_top_k", "max_model_len", "max_body_bytes", "max_sequences", "max_request_tokens",
            "max_tokens_in_flight", "max_generate_tokens", "batch_max_tokens",
            "tensor_parallel_size", "pipeline_parallel_size",
        )  # fmt: skip
        problems += [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        if not 0 <= self.admission_wait_s <= 600 or self.admission_queue < 0:
            problems.append(
                "admission_wait_s must lie in [0, 600] and admission_queue must be >= 0; got "
                f"{self.admission_wait_s} and {self.admission_queue}"
            )
        if self.request_timeout_s <= 0 or self.batch_wait_s < 0:
            problems.append("request_timeout_s must be positive and batch_wait_s non-negative")
        if self.max_request_tokens > self.max_tokens_in_flight:
            problems.append(
                f"max_request_tokens ({self.max_request_tokens}) above max_tokens_in_flight "
                f"({self.max_tokens_in_flight}) would refuse such a request forever"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("gpu_memory_utilization must lie in (0, 1]")
        if self.log_level not in ("debug", "info", "warning", "error"):
            problems.append(
                f"log_level must be debug, info, warning or error; got {self.log_level}"
            )
        if any(not key for key in self.api_keys):
            problems.append("api_keys must not be empty strings")
        if self.key_tokens_per_minute < 0 or self.key_max_requests_in_flight < 0:
            problems.append("key_tokens_per_minute and key_max_requests_in_flight must be >= 0")
        bad_hashes = [h for h in self.api_key_hashes if not _SHA256_HEX.fullmatch(h.lower())]
        if bad_hashes:
            problems.append(
                f"api_key_hashes must be sha256 hex digests (64 of 0-9a-f); {len(bad_hashes)} "
                "are not (hash a key with: printf %s KEY | sha256sum)"
            )
        else:
            try:
                self.key_quota_table()
            except ValueError as error:
                problems.append(str(error))
        if self.engine_restarts < 0:
            problems.append(
                f"engine_restarts must be >= 0 (0: a failed engine is not restarted); got "
                f"{self.engine_restarts}"
            )
        if not 0 <= self.engine_restart_backoff_s <= 3600:
            problems.append(
                f"engine_restart_backoff_s must lie in [0, 3600] seconds; got "
                f"{self.engine_restart_backoff_s}"
            )
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.devices):
            problems.append(f"devices must be GPU indices (integers >= 0); got {self.devices}")
        elif len(set(self.devices)) != len(self.devices):
            problems.append(f"devices lists a GPU twice: {self.devices}")
        elif self.devices and self.backend == "transformers" and len(self.devices) != 1:
            problems.append(
                f"the transformers engine runs on one device; devices {self.devices} names "
                f"{len(self.devices)} (give one, or use backend vllm for parallelism)"
            )
        elif self.devices and self.backend == "vllm":
            world = self.tensor_parallel_size * self.pipeline_parallel_size
            if len(self.devices) != world:
                problems.append(
                    f"vLLM with tensor_parallel_size {self.tensor_parallel_size} x "
                    f"pipeline_parallel_size {self.pipeline_parallel_size} needs {world} GPUs; "
                    f"devices names {len(self.devices)}: {self.devices}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        try:
            object.__setattr__(self, "_teacher_configs", self._resolve_teachers())
        except ValueError as error:
            raise ValueError(str(error)) from None
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "tokenizer_dirs", tuple(Path(d) for d in self.tokenizer_dirs))
        object.__setattr__(self, "api_key_hashes", tuple(h.lower() for h in self.api_key_hashes))

    # -- teachers --------------------------------------------------------------------------------

    def teacher_configs(self) -> dict[str, ServiceConfig]:
        """Every teacher's own configuration, by name, in the order they were given: this config
        with the teacher's settings applied and that teacher alone in ``teacher``."""
        configs: dict[str, ServiceConfig] = getattr(self, "_teacher_configs", {})
        return dict(configs)

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """The teachers' names, in the order they were given."""
        return tuple(self.teacher_configs())

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
        configs = self.teacher_configs()
        if len(configs) != 1:
            raise ValueError(
                f"this config holds {len(configs)} teachers; teacher_configs() gives each its own"
            )
        _, _, model = _split_teacher(self.teacher[0]) if self.teacher else ("", "", "")
        if not model:
            model = str(self.teachers[0]["model"])
        return model

    def _resolve_teachers(self) -> dict[str, ServiceConfig]:
        """Each teacher's config, checked: names, options, and GPUs shared beyond their memory."""
        specs: dict[str, dict[str, Any]] = {}
        problems: list[str] = []

        def add(name: str, model: str, settings: dict[str, Any], origin: str) -> None:
            if not TEACHER_NAME.fullmatch(name):
                problems.append(
                    f"{origin}: teacher name {name!r} must be 1-64 letters, digits, '.', '_' or "
                    "'-', starting with a letter or digit"
                )
            elif name in specs:
                problems.append(f"{origin}: teacher {name!r} is given twice")
            elif not model:
                problems.append(f"{origin}: teacher {name!r} needs a model (a path or hub name)")
            else:
                specs[name] = {"model": model, **settings}

        for entry in self.teacher:
            name, _, model = _split_teacher(entry)
            add(name, model, {}, f"--teacher {entry!r}")
        for index, table in enumerate(self.teachers):
            origin = f"teachers[{index}]"
            if not isinstance(table, dict):
                problems.append(f"{origin} must be a table (name, model, settings)")
                continue
            unknown = sorted(set(table) - {"name", "model", *TEACHER_KEYS})
            if unknown:
                problems.append(
                    f"{origin} has unknown keys {unknown}; a teacher takes name, model and "
                    f"{', '.join(TEACHER_KEYS)}"
                )
                continue
            settings = {k: v for k, v in table.items() if k not in ("name", "model")}
            wrong = [
                f"{origin}.{key} = {value!r} is not {_KINDS[_field_kind(key)]}"
                for key, value in settings.items()
                if not _has_kind(value, _field_kind(key))
            ] + [
                f"{origin}.{key} must be a string"
                for key in ("name", "model")
                if key in table and not isinstance(table[key], str)
            ]
            if wrong:
                problems += wrong
                continue
            add(str(table.get("name", "")), str(table.get("model", "")), settings, origin)
        for option in self.teacher_options:
            target, equals, value = option.partition("=")
            name, dot, key = target.strip().partition(".")
            if not dot or not equals or key not in TEACHER_KEYS:
                problems.append(
                    f"--teacher-options {option!r}: write NAME.KEY=VALUE with KEY one of "
                    f"{', '.join(TEACHER_KEYS)}"
                )
            elif name not in specs:
                problems.append(
                    f"--teacher-options {option!r}: no teacher {name!r} (teachers: "
                    f"{sorted(specs) or 'none'})"
                )
            else:
                try:
                    specs[name][key] = _option_value(key, value.strip())
                except ValueError as error:
                    problems.append(f"--teacher-options {option!r}: {error}")
        if self.default_teacher and self.default_teacher not in specs:
            problems.append(
                f"default_teacher {self.default_teacher!r} is not a teacher (teachers: "
                f"{sorted(specs) or 'none'})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        if len(specs) == 1 and not self.teachers and not self.teacher_options:
            # Already a single teacher's config: it is its own.
            return {next(iter(specs)): self}
        configs: dict[str, ServiceConfig] = {}
        for name, spec in specs.items():
            model = spec.pop("model")
            if "max_tokens_in_flight" in spec and "max_request_tokens" not in spec:
                # A teacher with a smaller admission limit takes requests that fit in it.
                spec["max_request_tokens"] = min(
                    self.max_request_tokens, int(spec["max_tokens_in_flight"])
                )
            try:
                configs[name] = replace(
                    self,
                    teacher=(f"{name}={model}",),
                    teacher_options=(),
                    teachers=(),
                    default_teacher="",
                    **spec,
                )
            except (TypeError, ValueError) as error:
                problems.append(f"teacher {name!r}: {error}")
        if problems:
            raise ValueError("; ".join(problems))
        problems += _shared_gpu_problems(configs)
        if problems:
            raise ValueError("; ".join(problems))
        return configs

    @property
    def accepted_key_hashes(self) -> frozenset[str]:
        """Hashes of every accepted API key (plain keys are hashed here)."""
        return frozenset(self.api_key_hashes) | {hash_api_key(k) for k in self.api_keys}

    def key_quota_table(self) -> dict[str, int]:
        """Tokens per minute of every accepted key hash with a quota (``ValueError`` for an
        override that names no key, or more than one)."""
        hashes = {h.lower() for h in self.accepted_key_hashes}
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


def _split_teacher(entry: str) -> tuple[str, str, str]:
    """``NAME=MODEL`` as (name, "=", model); a bare model (no ``=``, or text before it that is no
    name, as in a path ``/models/a=b``) is the teacher named ``default``."""
    name, sep, model = entry.partition("=")
    if sep and TEACHER_NAME.fullmatch(name.strip()):
        return name.strip(), sep, model.strip()
    return DEFAULT_TEACHER, "=", entry.strip()


_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "devices": "a list of GPU indices",
}


def _field_kind(key: str) -> str:
    """``int``, ``float``, ``str`` or ``devices``: what the ``ServiceConfig`` field takes."""
    kind = str({f.name: f.type for f in fields(ServiceConfig)}[key])
    return "devices" if "tuple" in kind else kind if kind in ("int", "float") else "str"


def _has_kind(value: Any, kind: str) -> bool:
    """Whether a TOML value suits a field of ``kind`` (an integer passes for a number)."""
    if isinstance(value, bool):
        return False
    if kind == "devices":
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if kind == "float":
        return isinstance(value, (int, float))
    return isinstance(value, int if kind == "int" else str)


def _option_value(key: str, text: str) -> Any:
    """``--teacher-options`` text as the type of the ``ServiceConfig`` field ``key``."""
    kind = {f.name: f.type for f in fields(ServiceConfig)}[key]
    try:
        if "tuple" in str(kind):
            return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
    except ValueError:
        raise ValueError(
            f"{key} takes {'integers like 0,1' if 'tuple' in str(kind) else kind}; got {text!r}"
        ) from None
    return text


def _shared_gpu_problems(configs: dict[str, ServiceConfig]) -> list[str]:
    """GPUs that several teachers share must hold all of them: their vLLM memory shares may not
    add up past the whole GPU."""
    users: dict[int, list[str]] = {}
    for name, config in configs.items():
        for gpu in config.devices:
            users.setdefault(gpu, []).append(name)
    problems = []
    for gpu, names in sorted(users.items()):
        if len(names) < 2:
            continue
        share = sum(
            configs[n].gpu_memory_utilization for n in names if configs[n].backend == "vllm"
        )
        if share > 1.0 + 1e-9:
            problems.append(
                f"GPU {gpu} is shared by teachers {names} whose gpu_memory_utilization adds up to "
                f"{share:.2f} > 1: give each its own GPU or lower their shares"
            )
    return problems


def load_config_file(path: Path | str) -> dict[str, Any]:
    """The ``ServiceConfig`` keys a TOML file sets (unknown keys are an error that names them)."""
    return load_toml(path, ServiceConfig)
