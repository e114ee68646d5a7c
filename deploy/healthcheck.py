#!/usr/bin/env python3
"""Container health check of a ``tokenbridge serve`` teacher: exit 0 when it serves, 1 otherwise.

Installed in the teacher images as ``tokenbridge-healthcheck`` and used by their ``HEALTHCHECK``,
by ``docker-compose.yml`` (``depends_on: condition: service_healthy``) and by the Kubernetes
probes. Standard library only, so it runs in any image with a Python.

- default (readiness): ``GET /readyz``. It needs a key when the service has keys: the first of
  ``TOKENBRIDGE_HEALTHCHECK_KEY``, ``TOKENBRIDGE_API_KEY`` or ``TOKENBRIDGE_API_KEYS`` (the
  variable ``tokenbridge serve`` itself reads). A service that keeps only hashes
  (``--api-key-hashes``) answers 401/403 to a probe without a plain key: then ``GET /healthz``
  (never guarded) must report ``"state": "ready"``.
- ``--live``: ``GET /healthz`` answers 200 (the process is up, even while the model loads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"


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


def check(base_url: str, live: bool, key: str | None, timeout: float) -> tuple[bool, str]:
    """Whether the service is alive (``live``) or ready, and a line saying why."""
    base_url = base_url.rstrip("/")
    try:
        if live:
            status, _ = _get(f"{base_url}/healthz", None, timeout)
            return status == 200, f"/healthz answered {status}"
        status, body = _get(f"{base_url}/readyz", key, timeout)
        if status not in (401, 403):
            return status == 200, f"/readyz answered {status}: {body[:200]!r}"
        # Keys are configured but this container holds only their hashes.
        status, body = _get(f"{base_url}/healthz", None, timeout)
        state = json.loads(body).get("state") if status == 200 else None
        return state == "ready", f"/readyz needs a key; /healthz answered {status}, state {state}"
    except (OSError, ValueError) as error:
        return False, f"{base_url} did not answer: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenbridge-healthcheck", description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    parser.add_argument("--live", action="store_true", help="liveness only (/healthz)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    args = parser.parse_args(argv)
    healthy, reason = check(args.url, args.live, probe_key(dict(os.environ)), args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
