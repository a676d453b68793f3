"""Real-server harness for the API integration tests: a fresh Postgres database (migrated with
Alembic), a `uvicorn --factory api.main:create_app` subprocess on a free loopback port configured
through CARCERT_* variables, API keys for two tenants, and httpx clients. No mocks.

Postgres comes from CARCERT_TEST_PG_URL (default postgresql+psycopg://root@127.0.0.1:5432/test);
the tests are skipped when it cannot be reached."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from carcert.cli_service import api_command, free_port

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("CARCERT_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CARCERT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _admin_dsn() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A throwaway Postgres database carcert_api_<random> migrated to head; its SQLAlchemy URL."""
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(_admin_dsn(), connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"Postgres not reachable at {PG_URL}: {exc}")
    from store.db import scratch_database

    with scratch_database(PG_URL, "carcert_api") as url:
        yield url


def create_key(db_url: str, tenant: str) -> str:
    from sqlalchemy.orm import Session

    from store.db import make_engine
    from store.keys import create_api_key

    engine = make_engine(db_url)
    with Session(engine) as s:
        key = create_api_key(s, tenant, "test")
        s.commit()
    engine.dispose()
    return key


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, tenant: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def server_env(db_url: str, tmp: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    env.update(
        CARCERT_DATABASE_URL=db_url,
        CARCERT_BROKER_URL=REDIS_URL,
        CARCERT_ARTIFACT_ROOT=str(tmp / "artifacts"),
        CARCERT_WORK_ROOT=str(tmp / "work"),
        CARCERT_DATA_ROOTS=f'["{tmp / "data"}"]',
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    return env


@contextlib.contextmanager
def run_server(
    env: dict[str, str],
    log_path: Path,
    startup_s: float = 60.0,
    keys: dict[str, str] | None = None,
) -> Iterator[Server]:
    """uvicorn subprocess (`--factory api.main:create_app`, one worker) on a free port; waits for
    /healthz; SIGTERM at the end. `keys` (tenant -> API key) become server.keys."""
    port = free_port()
    cmd = api_command(port)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=logf, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, env, log_path, dict(keys or {}))
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start in {startup_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def serve_with_worker(settings_env: dict[str, str], worker: object, log_path: Path) -> Iterator[Server]:
    """run_server on the test service's settings, with API keys for tenants alice and bob
    (server.keys) and the running Celery worker process beside it (server.worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    env.update(settings_env, PYTHONPATH=str(ROOT))
    with run_server(env, log_path) as srv:
        srv.keys = {t: create_key(settings_env["CARCERT_DATABASE_URL"], t) for t in ("alice", "bob")}
        srv.worker = worker
        yield srv


def poll_job(
    client: httpx.Client,
    job_id: str,
    timeout: float,
    done: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    interval: float = 0.5,
    log: Callable[[], str] | None = None,
) -> dict:
    """GET /jobs/{id} every `interval` s until its status is in `done`; the job. Fails after
    `timeout` s with the last status and stage (and `log()`, e.g. the worker's log, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in done:
            return job
        if time.monotonic() > deadline:
            extra = f":\n{log()}" if log else ""
            raise AssertionError(f"job still {job['status']} ({job['stage']}) after {timeout} s{extra}")
        time.sleep(interval)


def assert_problem(response: httpx.Response, status: int) -> dict:
    """The RFC 9457 shape: problem+json media type and type/title/status/detail members."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    return body
