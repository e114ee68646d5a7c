"""The CPU compose variant's own commands, run here without Docker (there is no engine on these
machines): what ``deploy/compose.cpu.yml`` runs, as ``docker-compose config`` resolves it, with each
volume mapped to a folder and the teacher's port to a free one.

Its one-shot services build the tiny models, its teacher service hosts two of them (``math`` and
``code``, two tokenizer families) and turns healthy for ``deploy/healthcheck.py`` as compose asks
(every teacher ready; with the key, and without it through ``/healthz``'s state), and both
students train through the trainer image's entry point (``deploy/entrypoint.py``) against both
teachers (one in turn, one mixed): a first start with ``--resume`` begins a new run, a restart with
more steps resumes it, and the service has scored tokens with each teacher. That is what
``deploy/smoke.sh`` checks on a machine with Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tokenbridge.cli import main as tokenbridge_main
from tokenbridge.process import free_port, serve_process

from test_static import DEPLOY, KEY, compose_config, load_script, volume_mounts
from tests.support.paths import CACHE_DIR

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.process]


def host_argv(service: dict[str, Any], volumes: Path, port: int) -> list[str]:
    """The service's command with every path inside a mounted volume moved to ``volumes/NAME``
    (a bind mount's paths to its host folder) and the teacher's address to 127.0.0.1:``port``."""
    mounts = volume_mounts(service)
    argv = []
    for arg in map(str, service["command"]):
        # A path may stand alone or be the value of NAME=PATH (``--teacher math=/models/...``).
        name, equals, value = arg.rpartition("=")
        for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if value == target or value.startswith(target + "/"):
                arg = name + equals + str(volumes / source) + value[len(target) :]
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
        # The compose health check as the container runs it, against the real service.
        test = teacher["healthcheck"]["test"]
        assert test[:2] == ["CMD", "tokenbridge-healthcheck"]
        command = [sys.executable, str(DEPLOY / "healthcheck.py"), *test[2:], "--url", url]
        run = subprocess.run(
            command, capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ.get("PATH", ""), "TOKENBRIDGE_API_KEYS": KEY},
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert "every teacher ready" in run.stdout
        healthy, reason = health.check(url, False, KEY, 10.0)
        assert healthy and reason.startswith("/readyz answered 200")
        healthy, reason = health.check(url, False, None, 10.0, health.ALL)
        assert healthy and "state ready" in reason
        healthy, reason = health.check(url, False, KEY, 10.0, ["math", "code"])
        assert healthy, reason
        healthy, reason = health.check(url, False, KEY, 10.0, ["maths"])
        assert not healthy and "no such teacher" in reason

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

        # Both teachers scored for the students.
        metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
        for name in ("math", "code"):
            scored = [
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("tokenbridge_teacher_tokens_total{")
                and f'teacher="{name}"' in line
            ]
            assert sum(scored) > 0, f"teacher {name} scored nothing:\n{metrics[-3000:]}"
    # Each student wrote its run into its own volume.
    for name in ("student-a-runs", "student-b-runs"):
        assert (volumes / name / "checkpoint.pt").is_file()
        assert (volumes / name / "metrics.jsonl").is_file()
