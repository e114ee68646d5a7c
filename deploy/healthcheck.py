#!/usr/bin/env python3
"""Container health check of a ``tokenbridge serve`` teacher: exit 0 when it serves, 1 otherwise.

Installed in the teacher images as ``tokenbridge-healthcheck`` and used by their ``HEALTHCHECK``,
by ``docker-compose.yml`` (``depends_on: condition: service_healthy``) and by the Kubernetes
probes. Standard library only, so it runs in any image with a Python.

What "serves" means, for a service that hosts several named teachers:

- default (readiness): ``GET /readyz`` answers 200, which it does while *at least one* teacher
  accepts work (a service with one teacher: that teacher is ready).
- ``--all-teachers``: *every* teacher is ready: ``GET /readyz`` answers 200 and its body's
  ``unready`` list is empty. ``docker-compose.yml`` uses this, so that the students start only
  once all their teachers have loaded.
- ``--teacher NAME`` (repeatable): each named teacher is ready: ``GET /readyz?teacher=NAME``
  answers 200 for every one (404, an unknown name, is unhealthy too).
- ``--live``: ``GET /healthz`` answers 200 (the process is up, even while the models load, and
  while some teacher still serves or restarts; 503 only once every teacher failed).

``/readyz`` needs a key when the service has keys: the first of ``TOKENBRIDGE_HEALTHCHECK_KEY``,
``TOKENBRIDGE_API_KEY`` or ``TOKENBRIDGE_API_KEYS`` (the variable ``tokenbridge serve`` itself
reads). A service that keeps only hashes (``--api-key-hashes``) answers 401/403 to a probe without
a plain key: then ``GET /healthz`` (never guarded) decides from the service's summary state, which
is ``ready`` when every teacher is ready and ``degraded`` while only some are. The default accepts
either; ``--all-teachers`` and ``--teacher`` require ``ready`` (``/healthz`` does not break the
state down by teacher, so a named teacher counts as ready only when all are).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

DEFAULT_URL = "http://127.0.0.1:8000"
#: Modes: some teacher ready (the service's own /readyz), every teacher, the named ones.
ANY, ALL = "any", "all"


def probe_key(environ: dict[str, str]) -> str | None:
    """The plain key to present, if the environment holds one."""
    for name in ("TOKENBRIDGE_HEALTHCHECK_KEY", "TOKENBRIDGE_API_KEY", "TOKENBRIDGE_API_KEYS"):
        keys = [k.strip() for k in environ.get(name, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def _get(url: str, key: str | None, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _state_fallback(base_url: str, timeout: float, accepted: set[str]) -> tuple[bool, str]:
    """Keys are configured but this container holds only their hashes: /healthz's state."""
    status, body = _get(f"{base_url}/healthz", None, timeout)
    state = json.loads(body).get("state") if status == 200 else None
    return state in accepted, f"/readyz needs a key; /healthz answered {status}, state {state}"


def _named(
    base_url: str, names: Sequence[str], key: str | None, timeout: float
) -> tuple[bool, str]:
    """Whether each named teacher is ready (``/readyz?teacher=NAME``)."""
    unready = []
    for name in names:
        query = urllib.parse.urlencode({"teacher": name})
        status, body = _get(f"{base_url}/readyz?{query}", key, timeout)
        if status in (401, 403):
            return _state_fallback(base_url, timeout, {"ready"})
        if status == 404:
            unready.append(f"{name} (no such teacher: {body[:200]!r})")
        elif status != 200:
            state = json.loads(body).get("state") if body.startswith(b"{") else None
            unready.append(f"{name} ({status}, state {state})")
    if unready:
        return False, "teachers not ready: " + ", ".join(unready)
    return True, f"/readyz?teacher= answered 200 for {', '.join(names)}"


def check(
    base_url: str,
    live: bool,
    key: str | None,
    timeout: float,
    teachers: str | Sequence[str] = ANY,
) -> tuple[bool, str]:
    """Whether the service is alive (``live``) or ready, and a line saying why. ``teachers``: the
    readiness asked for: ``ANY`` teacher, ``ALL`` of them, or a list of names that must be."""
    base_url = base_url.rstrip("/")
    try:
        if live:
            status, _ = _get(f"{base_url}/healthz", None, timeout)
            return status == 200, f"/healthz answered {status}"
        if not isinstance(teachers, str):
            return _named(base_url, list(teachers), key, timeout)
        status, body = _get(f"{base_url}/readyz", key, timeout)
        if status in (401, 403):
            accepted = {"ready"} if teachers == ALL else {"ready", "degraded"}
            return _state_fallback(base_url, timeout, accepted)
        if teachers == ALL and status == 200:
            unready = json.loads(body).get("unready", [])
            if unready:
                return False, f"/readyz answered 200 but teachers {unready} are not ready"
            return True, "/readyz answered 200, every teacher ready"
        return status == 200, f"/readyz answered {status}: {body[:200]!r}"
    except (OSError, ValueError) as error:
        return False, f"{base_url} did not answer: {error}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge-healthcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="liveness only (/healthz)")
    mode.add_argument(
        "--all-teachers", action="store_true", help="every teacher must be ready (not just one)"
    )
    mode.add_argument(
        "--teacher",
        action="append",
        metavar="NAME",
        help="this teacher must be ready (repeat for several)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


def wanted_teachers(args: argparse.Namespace) -> str | list[str]:
    """The readiness the parsed flags ask for: ``ANY``, ``ALL`` or the teachers' names."""
    if args.teacher:
        return list(args.teacher)
    return ALL if args.all_teachers else ANY


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = probe_key(dict(os.environ))
    healthy, reason = check(args.url, args.live, key, args.timeout, wanted_teachers(args))
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
