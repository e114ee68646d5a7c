"""``tokenbridge serve`` as a process of its own, as a user runs it: for the experiment, the demo,
the benchmarks and the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ServiceStartError", "free_port", "serve_process", "wait_ready"]


class ServiceStartError(RuntimeError):
    """The service process exited or never became ready; the message names its log."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 180,
    headers: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``/readyz`` until it answers 200; raise ``ServiceStartError`` if the process exits
    first or ``timeout`` seconds pass."""
    import httpx

    where = f" (its log: {log_path})" if log_path is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(f"serve exited early with status {process.returncode}{where}")
        try:
            response = httpx.get(url + "/readyz", headers=headers, timeout=2)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise ServiceStartError(f"serve did not become ready in {timeout:.0f} s{where}")


@contextlib.contextmanager
def serve_process(
    args: list[str],
    log_dir: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 180,
    cwd: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``tokenbridge serve ARGS --port P`` as a process, ready; yields (url, process, log path).

    Its output goes to a file, not a pipe (a full pipe would stall the server); the process is
    terminated (then killed) on exit unless it already stopped.
    """
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    command = [sys.executable, "-m", "tokenbridge", "serve", *args, "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, timeout=timeout, headers=headers, log_path=log_path)
            yield url, process, log_path
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)
