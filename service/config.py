"""Service configuration: one frozen dataclass, validated when built.

``tokenbridge serve`` generates its flags from ``ServiceConfig``; a TOML file (``--config``) gives
the same keys. Environment variables are read only by the command-line entry point.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.configargs import load_toml

__all__ = ["BACKENDS", "ServiceConfig", "hash_api_key", "load_config_file"]

BACKENDS = ("transformers", "vllm")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_api_key(key: str) -> str:
    """The stored form of an API key (keys themselves are never kept or logged)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``tokenbridge serve`` needs. Limits are per request unless said otherwise."""

    teacher: str = field(
        default="", metadata={"help": "teacher model: a local folder or a hub name"}
    )
    backend: str = field(default="transformers", metadata={"help": "engine: transformers | vllm"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    data_dir: Path = field(
        default=Path("tokenbridge-data"),
        metadata={"help": "registered student tokenizers and mapping tables live here"},
    )
    device: str = field(default="cpu", metadata={"help": "transformers engine device"})
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
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "tokenizer_dirs", tuple(Path(d) for d in self.tokenizer_dirs))
        object.__setattr__(self, "api_key_hashes", tuple(h.lower() for h in self.api_key_hashes))

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


def load_config_file(path: Path | str) -> dict[str, Any]:
    """The ``ServiceConfig`` keys a TOML file sets (unknown keys are an error that names them)."""
    return load_toml(path, ServiceConfig)
