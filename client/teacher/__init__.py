"""The async client of the teacher service, for the trainer (and a blocking facade for notebooks).

One ``httpx.AsyncClient`` is shared by every call; at most ``max_concurrency`` requests are in
flight at once, spread over the replicas (least in flight first, round robin among equals).

``start()`` reads ``GET /v1/info`` on every replica, refuses a ``top_k`` above the service's
``max_top_k``, registers the student tokenizer (idempotent: the id is a content hash) and checks
that all replicas serve the same teacher vocabulary and gave the same student id.

Retries follow the transport conventions: only connection failures (refused, timed out while
connecting), 429 and 503 are retried, with full-jitter exponential backoff and never sooner than a
``Retry-After`` the replica sent; a retry goes to another replica when one is free. A replica that
refuses connections is set aside for ``replica_cooldown_s`` and verified again (info and
registration) before it is trusted with work. Other errors are raised at once: a 4xx says the
request itself is wrong, and a connection lost after sending may have left the work running on the
teacher, so resending it would double the load. A 404 saying the student is not registered (the
teacher restarted with a fresh data dir) re-registers it once and resends the request.

The package's parts: ``config`` (the configuration and result types), ``bodies`` (registration
and score bodies), ``pool`` (replicas and the request loop), ``handshake`` (start-up checks and
re-checks), ``client`` (``TeacherClient``) and ``sync`` (``SyncTeacherClient``).
"""

from tokenbridge.client.teacher.bodies import registration_body
from tokenbridge.client.teacher.client import TeacherClient
from tokenbridge.client.teacher.config import (
    ClientStats,
    Completion,
    GenerateResult,
    ScoreResult,
    TeacherClientConfig,
)
from tokenbridge.client.teacher.handshake import teacher_view
from tokenbridge.client.teacher.sync import SyncTeacherClient

__all__ = [
    "ClientStats",
    "Completion",
    "GenerateResult",
    "ScoreResult",
    "SyncTeacherClient",
    "TeacherClient",
    "TeacherClientConfig",
    "registration_body",
    "teacher_view",
]
