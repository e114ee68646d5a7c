"""The CPU compose variant's own commands, run here without Docker (there is no engine on these
machines): what ``deploy/compose.cpu.yml`` runs, as ``docker-compose config`` resolves it, with each
volume mapped to a folder and the teacher's port to a free one.

Its three one-shot services build the tiny models, its teacher serves them and turns healthy for
``deploy/healthcheck.py`` (with the key, and without it through ``/healthz``'s state), and both
students train through the trainer image's entry point (``deploy/entrypoint.py``): a first start
with ``--resume`` begins a new run, a restart with more steps resumes it. That is what
``deploy/smoke.sh`` checks on a machine with Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenbridge.cli import main as tokenbridge_main
from tokenbridge.process import free_port, serve_process

from conftest import CACHE_DIR
from test_static import DEPLOY, KEY, compose_config, load_script, volume_mounts

pytestmark = pytest.mark.slow


def host_argv(service: dict[str, Any], volumes: Path, port: int) -> list[str]:
    """The service's command with every path inside a mounted volume moved to ``volumes/NAME``
    and the teacher's address to 127.0.0.1:``port``."""
    mounts = volume_mounts(service)
    argv = []
    for arg in map(str, service["command"]):
        for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if arg == target or arg.startswith(target + "/"):
                arg = str(volumes / source) + arg[len(target) :]
                break
        argv.append(arg.replace("http://teacher:8000", f"http://127.0.0.1:{port}"))
    return argv


def train(argv: list[str], steps: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One start of a student container: the image's entry point with its command."""
    argv = [*argv]
    argv[argv.index("--steps") + 1] = str(steps)
    return subprocess.run(
        [sys.executable, str(DEPLOY / "entrypoint.py"), *argv],
        capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "TOKENBRIDGE_API_KEY": KEY, "TOKENBRIDGE_CACHE": str(CACHE_DIR)},
    )  # fmt: skip


def test_cpu_variant_commands_serve_and_train_and_resume(tmp_path, monkeypatch):
    config = compose_config("cpu")
    services = config["services"]
    volumes = tmp_path / "volumes"
    for name in config["volumes"]:
        (volumes / name).mkdir(parents=True)
    port = free_port()
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(CACHE_DIR))

    for name, service in services.items():
        if service["command"][0] == "tiny-model":
            assert tokenbridge_main(host_argv(service, volumes, port)) == 0, name

    teacher = services["teacher"]
    assert teacher["environment"]["TOKENBRIDGE_API_KEYS"] == KEY
    serve_args = host_argv(teacher, volumes, port)[1:]
    env = {"TOKENBRIDGE_API_KEYS": KEY, "TOKENBRIDGE_CACHE": str(CACHE_DIR)}
    headers = {"authorization": f"Bearer {KEY}"}
    with serve_process(serve_args, tmp_path, port=port, env=env, headers=headers) as (url, _, _):
        health = load_script("healthcheck")
        healthy, reason = health.check(url, False, KEY, 10.0)
        assert healthy and reason.startswith("/readyz answered 200")
        healthy, reason = health.check(url, False, None, 10.0)
        assert healthy and "state ready" in reason

        student_a = host_argv(services["student-a"], volumes, port)
        first = train(student_a, 2, tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "no checkpoint at" in first.stderr and "trained 2 steps" in first.stdout
        again = train(student_a, 3, tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming from" in again.stderr and "trained 3 steps" in again.stdout

        student_b = host_argv(services["student-b"], volumes, port)
        other = train(student_b, 2, tmp_path)
        assert other.returncode == 0, other.stderr[-3000:]
        assert "trained 2 steps" in other.stdout
    # Each student wrote its run into its own volume.
    for name in ("student-a-runs", "student-b-runs"):
        assert (volumes / name / "checkpoint.pt").is_file()
        assert (volumes / name / "metrics.jsonl").is_file()
