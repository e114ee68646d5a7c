"""Service configuration: one frozen dataclass, validated when built.

``tokenbridge serve`` generates its flags from ``ServiceConfig``; a TOML file (``--config``) gives
the same keys. Environment variables are read only by the command-line entry point.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.configargs import load_toml

__all__ = ["BACKENDS", "ServiceConfig", "hash_api_key", "load_config_file"]

BACKENDS = ("transformers", "vllm")


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
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "vLLM pipeline parallelism"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM memory share"})
    probe_text: str = field(
        default="The quick brown fox, 1234 apples and naïve café déjà vu: 🦊!\n",
        metadata={"help": "text used to report the 1:1 share when a student registers"},
    )
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

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
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def accepted_key_hashes(self) -> frozenset[str]:
        """Hashes of every accepted API key (plain keys are hashed here)."""
        return frozenset(self.api_key_hashes) | {hash_api_key(k) for k in self.api_keys}


def load_config_file(path: Path | str) -> dict[str, Any]:
    """The ``ServiceConfig`` keys a TOML file sets (unknown keys are an error that names them)."""
    return load_toml(path, ServiceConfig)
