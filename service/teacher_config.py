"""Each teacher's configuration: the settings a teacher may set for itself, and the one parser
of the three places teachers are named.

A teacher is named by ``--teacher NAME=PATH_OR_HUB`` (repeated; a bare ``--teacher PATH_OR_HUB``
names it ``default``) or by a ``[[teachers]]`` table of the TOML file, and overrides the service's
defaults for the fields of ``TeacherSettings`` (``TEACHER_KEYS``) with ``--teacher-options
NAME.KEY=VALUE`` or keys of its table. ``parse_teachers`` turns those into one ``TeacherConfig``
per teacher; ``ServiceConfig`` (``service/config.py``) carries the defaults and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tokenbridge.shared.protocol import DEFAULT_TEACHER, TEACHER_NAME

__all__ = ["BACKENDS", "TEACHER_KEYS", "TeacherConfig", "TeacherSettings", "parse_teachers"]

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class TeacherSettings:
    """What each teacher may set for itself: its engine, devices and limits. On ``ServiceConfig``
    these are every teacher's defaults; on ``TeacherConfig``, one teacher's own values."""

    backend: str = field(default="transformers", metadata={"help": "engine: transformers | vllm"})
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
    batch_wait_s: float = field(
        default=0.005, metadata={"help": "transformers batcher: longest wait for a batch to fill"}
    )
    batch_max_tokens: int = field(
        default=8192, metadata={"help": "transformers batcher: most tokens per forward pass"}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "vLLM pipeline parallelism"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM memory share"})
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
        # Sequences arrive as lists from TOML and argparse; the frozen config keeps tuples.
        self._normalise()
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _normalise(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))

    def _problems(self) -> list[str]:
        """Why these settings cannot run (empty when they can)."""
        problems: list[str] = []
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        positive = (
            "max_top_k", "max_model_len", "max_request_tokens", "max_tokens_in_flight",
            "max_generate_tokens", "batch_max_tokens", "tensor_parallel_size",
            "pipeline_parallel_size",
        )  # fmt: skip
        problems += [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        if not 0 <= self.admission_wait_s <= 600 or self.admission_queue < 0:
            problems.append(
                "admission_wait_s must lie in [0, 600] and admission_queue must be >= 0; got "
                f"{self.admission_wait_s} and {self.admission_queue}"
            )
        if self.batch_wait_s < 0:
            problems.append(f"batch_wait_s must be non-negative; got {self.batch_wait_s}")
        if self.max_request_tokens > self.max_tokens_in_flight:
            problems.append(
                f"max_request_tokens ({self.max_request_tokens}) above max_tokens_in_flight "
                f"({self.max_tokens_in_flight}) would refuse such a request forever"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("gpu_memory_utilization must lie in (0, 1]")
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
        return problems + self._device_problems()

    def _device_problems(self) -> list[str]:
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.devices):
            return [f"devices must be GPU indices (integers >= 0); got {self.devices}"]
        if len(set(self.devices)) != len(self.devices):
            return [f"devices lists a GPU twice: {self.devices}"]
        if self.devices and self.backend == "transformers" and len(self.devices) != 1:
            return [
                f"the transformers engine runs on one device; devices {self.devices} names "
                f"{len(self.devices)} (give one, or use backend vllm for parallelism)"
            ]
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.devices and self.backend == "vllm" and len(self.devices) != world:
            return [
                f"vLLM with tensor_parallel_size {self.tensor_parallel_size} x "
                f"pipeline_parallel_size {self.pipeline_parallel_size} needs {world} GPUs; "
                f"devices names {len(self.devices)}: {self.devices}"
            ]
        return []

    def settings(self) -> dict[str, Any]:
        """The teacher settings alone, by key (``TEACHER_KEYS``)."""
        return {key: getattr(self, key) for key in TEACHER_KEYS}


#: Fields each teacher may set for itself; the service-wide values are their defaults.
TEACHER_KEYS = tuple(f.name for f in fields(TeacherSettings))


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(TeacherSettings):
    """One teacher: its name, its model and its own settings (``parse_teachers`` builds these)."""

    name: str = field(metadata={"help": "the teacher's name, as requests give it"})
    model: str = field(
        metadata={"help": "path or hub name of its weights ('' for an engine given ready-made)"}
    )

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not TEACHER_NAME.fullmatch(self.name):
            problems.insert(
                0,
                f"teacher name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        return problems


def parse_teachers(
    teacher: tuple[str, ...],
    teacher_options: tuple[str, ...],
    tables: tuple[dict[str, Any], ...],
    defaults: TeacherSettings,
    default_teacher: str = "",
) -> dict[str, TeacherConfig]:
    """Every teacher's config, in the order given, from the three places teachers are named:
    ``--teacher NAME=MODEL`` entries, ``[[teachers]]`` tables (name, model, any of
    ``TEACHER_KEYS``) and ``--teacher-options NAME.KEY=VALUE``, over the ``defaults``' settings.

    Raises ``ValueError`` naming every problem: bad or repeated names, missing models, unknown
    keys, values of the wrong kind, a ``default_teacher`` that is none of them, settings that
    cannot run, and GPUs shared past their memory.
    """
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

    for entry in teacher:
        name, model = _split_teacher(entry)
        add(name, model, {}, f"--teacher {entry!r}")
    for index, table in enumerate(tables):
        origin = f"teachers[{index}]"
        settings, table_problems = _table_settings(table, origin)
        problems += table_problems
        if not table_problems:
            add(str(table.get("name", "")), str(table.get("model", "")), settings, origin)
    for option in teacher_options:
        problems += _apply_option(option, specs)
    if default_teacher and default_teacher not in specs:
        problems.append(
            f"default_teacher {default_teacher!r} is not a teacher (teachers: "
            f"{sorted(specs) or 'none'})"
        )
    if problems:
        raise ValueError("; ".join(problems))
    configs: dict[str, TeacherConfig] = {}
    for name, spec in specs.items():
        model = spec.pop("model")
        if "max_tokens_in_flight" in spec and "max_request_tokens" not in spec:
            # A teacher with a smaller admission limit takes requests that fit in it.
            spec["max_request_tokens"] = min(
                defaults.max_request_tokens, int(spec["max_tokens_in_flight"])
            )
        try:
            configs[name] = TeacherConfig(name=name, model=model, **{**defaults.settings(), **spec})
        except (TypeError, ValueError) as error:
            problems.append(f"teacher {name!r}: {error}")
    problems += _shared_gpu_problems(configs)
    if problems:
        raise ValueError("; ".join(problems))
    return configs


def _split_teacher(entry: str) -> tuple[str, str]:
    """``NAME=MODEL`` as (name, model); a bare model (no ``=``, or text before it that is no
    name, as in a path ``/models/a=b``) is the teacher named ``default``."""
    name, sep, model = entry.partition("=")
    if sep and TEACHER_NAME.fullmatch(name.strip()):
        return name.strip(), model.strip()
    return DEFAULT_TEACHER, entry.strip()


def _table_settings(table: Any, origin: str) -> tuple[dict[str, Any], list[str]]:
    """A ``[[teachers]]`` table's settings (all but name and model), and what is wrong in it."""
    if not isinstance(table, dict):
        return {}, [f"{origin} must be a table (name, model, settings)"]
    unknown = sorted(set(table) - {"name", "model", *TEACHER_KEYS})
    if unknown:
        return {}, [
            f"{origin} has unknown keys {unknown}; a teacher takes name, model and "
            f"{', '.join(TEACHER_KEYS)}"
        ]
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
    return settings, wrong


def _apply_option(option: str, specs: dict[str, dict[str, Any]]) -> list[str]:
    """Set one ``--teacher-options NAME.KEY=VALUE`` in ``specs``; what is wrong with it."""
    target, equals, value = option.partition("=")
    name, dot, key = target.strip().partition(".")
    if not dot or not equals or key not in TEACHER_KEYS:
        return [
            f"--teacher-options {option!r}: write NAME.KEY=VALUE with KEY one of "
            f"{', '.join(TEACHER_KEYS)}"
        ]
    if name not in specs:
        return [
            f"--teacher-options {option!r}: no teacher {name!r} (teachers: "
            f"{sorted(specs) or 'none'})"
        ]
    try:
        specs[name][key] = _option_value(key, value.strip())
    except ValueError as error:
        return [f"--teacher-options {option!r}: {error}"]
    return []


_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "devices": "a list of GPU indices",
}


def _field_kind(key: str) -> str:
    """``int``, ``float``, ``str`` or ``devices``: what the ``TeacherSettings`` field takes."""
    kind = str({f.name: f.type for f in fields(TeacherSettings)}[key])
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
    """``--teacher-options`` text as the type of the ``TeacherSettings`` field ``key``."""
    kind = _field_kind(key)
    try:
        if kind == "devices":
            return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        wanted = "integers like 0,1" if kind == "devices" else kind
        raise ValueError(f"{key} takes {wanted}; got {text!r}") from None
    return text


def _shared_gpu_problems(configs: dict[str, TeacherConfig]) -> list[str]:
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
