"""Prometheus metrics of one service instance, on its own registry so apps never mix.

Everything one teacher does carries a ``teacher`` label (its name); requests carry the teacher
they named (``""`` for routes that name none).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServiceMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BYTES_BUCKETS = tuple(float(4**n) for n in range(4, 14))


class ServiceMetrics:
    """Requests by route and status, latency, positions, tokens in flight, payload, stage times."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenbridge_requests",
            "Requests by route, status and teacher",
            ["route", "status", "teacher"],
            registry=r,
        )
        self.latency = Histogram(
            "tokenbridge_request_seconds", "Request latency", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.scored_positions = Counter(
            "tokenbridge_scored_positions", "Student positions scored", ["teacher"], registry=r
        )
        self.teacher_tokens = Counter(
            "tokenbridge_teacher_tokens",
            "Teacher tokens read by the engine",
            ["kind", "teacher"],
            registry=r,
        )
        self.tokens_in_flight = Gauge(
            "tokenbridge_tokens_in_flight",
            "Teacher tokens admitted and not finished",
            ["teacher"],
            registry=r,
        )
        self.payload_bytes = Histogram(
            "tokenbridge_payload_bytes", "Body sizes", ["direction"],
            buckets=_BYTES_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "tokenbridge_stage_seconds", "Time per stage of a score request (prepare, engine, "
            "mapping, encode)", ["stage", "teacher"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "tokenbridge_rejected", "Requests refused by admission control", ["teacher"], registry=r
        )
        self.quota_refusals = Counter(
            "tokenbridge_quota_refusals",
            "Requests refused by a per-key quota",
            ["key_id"],
            registry=r,
        )
        self.key_teacher_tokens = Counter(
            "tokenbridge_key_teacher_tokens",
            "Teacher tokens used per API key and teacher",
            ["key_id", "teacher"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "tokenbridge_engine_restarts",
            "Times a failed engine was restarted",
            ["teacher"],
            registry=r,
        )
        self.admission_waiting = Gauge(
            "tokenbridge_admission_waiting",
            "Requests waiting in line for admission",
            ["teacher"],
            registry=r,
        )
        self.ready = Gauge(
            "tokenbridge_ready", "1 when the teacher accepts work", ["teacher"], registry=r
        )
