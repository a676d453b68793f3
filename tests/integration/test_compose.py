"""docker-compose.yml and the Dockerfiles: the services, their wiring and the GPU reservation.
`docker compose config` validates the file when the compose plugin is installed; the structural
checks below run everywhere (no engine needed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.integration.service_helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_gpu_reservation(compose):
    services = compose["services"]
    assert {"postgres", "redis", "minio", "api", "worker"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["api"]  # the API needs no GPU


def test_api_and_worker_share_one_configuration(compose):
    api, worker = compose["services"]["api"]["environment"], compose["services"]["worker"]["environment"]
    keys = (
        "CARCERT_DATABASE_URL",
        "CARCERT_BROKER_URL",
        "CARCERT_ARTIFACT_BACKEND",
        "CARCERT_S3_BUCKET",
        "CARCERT_S3_ENDPOINT_URL",
    )
    assert {k: api[k] for k in keys} == {k: worker[k] for k in keys}
    assert "@postgres:5432/" in api["CARCERT_DATABASE_URL"]
    assert api["CARCERT_BROKER_URL"].startswith("redis://redis:6379")
    assert api["CARCERT_S3_ENDPOINT_URL"] == "http://minio:9000"
    # every URL points at a service of this file
    for dep in ("migrate", "redis", "minio-init"):
        assert dep in compose["services"]["api"]["depends_on"]
        assert dep in compose["services"]["worker"]["depends_on"]
    assert compose["services"]["migrate"]["command"] == ["carcert", "migrate"]


def test_dockerfiles_exist_and_copy_the_packages(compose):
    for name, base in (("api", "python:3.11-slim"), ("worker", "nvidia/cuda:")):
        build = compose["services"][name]["build"]
        dockerfile = ROOT / build["dockerfile"]
        text = dockerfile.read_text()
        froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
        assert froms and froms[0].startswith(base)
        for pkg in ("core", "store", "api", "worker", "migrations", "carcert"):
            assert f"COPY {pkg} ./{pkg}" in text
            assert (ROOT / pkg).is_dir()
        assert (dockerfile.parent / (dockerfile.name + ".dockerignore")).is_file()


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker client not installed")
def test_docker_compose_config_validates():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    res = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
