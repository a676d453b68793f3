"""Shared fixtures of the integration suite: real Postgres, Redis and Celery worker, no mocks.

Servers (override with env): CARCERT_TEST_PG_ADMIN_URL (default
postgresql+psycopg://root@127.0.0.1:5432/test, trust auth), CARCERT_TEST_REDIS_URL (default
redis://127.0.0.1:6379). When a server is unreachable the tests that need it are skipped with
the reason, or fail when CARCERT_REQUIRE_SERVICES=1 (CI).

Fixtures:
  pg_admin_url        URL of the admin database (CREATE/DROP DATABASE run there)
  fresh_pg_db         factory: `with fresh_pg_db() as url:` an empty database dropped afterwards
  pg_url              session: a fresh database carcert_test_<hex>, migrated to head, dropped at the end
  redis_url           session: redis://.../<n> on a database number nobody uses, flushed at the end
  service_dirs        session: {"artifacts", "work", "data"} temporary folders
  settings_env        session: the CARCERT_* variables pointing at pg_url / redis_url / service_dirs
                      (short lease and sweep times); also applied to os.environ of the test process
                      (store caches reset) for the whole session
  celery_worker_proc  session: a real Celery worker subprocess (solo pool) on settings_env, ready;
                      .log_path holds its log
  db                  function: a Session on pg_url (commit yourself; closed afterwards)
  tenant              function: a fresh tenant name
  start_worker        factory: start another worker subprocess with extra env (stopped at the end)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.service_helpers import WorkerProc, launch_worker

PG_ADMIN_URL = os.environ.get("CARCERT_TEST_PG_ADMIN_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("CARCERT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REQUIRE = os.environ.get("CARCERT_REQUIRE_SERVICES") == "1"


def _unavailable(what: str, exc: BaseException) -> None:
    msg = f"{what} not reachable: {exc}"
    if REQUIRE:
        pytest.fail(msg)
    pytest.skip(msg)


# ------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
    except Exception as exc:  # noqa: BLE001
        _unavailable("Postgres", exc)
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def fresh_pg_db(pg_admin_url: str) -> Callable[[], contextlib.AbstractContextManager[str]]:
    """A factory of empty throwaway databases (not migrated), dropped on exit."""
    from store.db import scratch_database

    return lambda: scratch_database(pg_admin_url, "carcert_test", migrate=False)


@pytest.fixture(scope="session")
def pg_url(fresh_pg_db) -> Iterator[str]:
    from store.db import init_db, make_engine

    with fresh_pg_db() as url:
        engine = make_engine(url)
        init_db(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    try:
        r0 = redis.Redis.from_url(f"{REDIS_BASE_URL}/0", socket_connect_timeout=2)
        r0.ping()
        n_db = int(r0.config_get("databases").get("databases", 16))
    except Exception as exc:  # noqa: BLE001
        _unavailable("Redis", exc)
    marker = f"carcert-test-{uuid.uuid4().hex}"
    chosen = None
    for n in range(n_db - 1, 0, -1):  # high numbers first: the app's default is 0
        r = redis.Redis.from_url(f"{REDIS_BASE_URL}/{n}")
        if r.dbsize() == 0 and r.set("carcert:test:owner", marker, nx=True):
            chosen = n
            break
    if chosen is None:
        pytest.skip("no empty Redis database number available")
    url = f"{REDIS_BASE_URL}/{chosen}"
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def service_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("carcert-service")
    dirs = {k: base / k for k in ("artifacts", "work", "data")}
    for d in dirs.values():
        d.mkdir()
    return dirs


@pytest.fixture(scope="session")
def settings_env(pg_url: str, redis_url: str, service_dirs: dict[str, Path]) -> Iterator[dict[str, str]]:
    from store.db import reset_caches

    env = {
        "CARCERT_DATABASE_URL": pg_url,
        "CARCERT_BROKER_URL": redis_url,
        "CARCERT_ARTIFACT_BACKEND": "local",
        "CARCERT_ARTIFACT_ROOT": str(service_dirs["artifacts"]),
        "CARCERT_WORK_ROOT": str(service_dirs["work"]),
        "CARCERT_DATA_ROOTS": f'["/usr/share/datasets", "{service_dirs["data"]}"]',
        "CARCERT_LEASE_SECONDS": "6",
        "CARCERT_QUEUED_STALE_SECONDS": "4",
        "CARCERT_SWEEP_INTERVAL_S": "2",
        "CARCERT_PROGRESS_INTERVAL_S": "0.2",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_caches()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_caches()


# ------------------------------------------------------------------------------------------ workers


@pytest.fixture(scope="session")
def celery_worker_proc(settings_env: dict[str, str], tmp_path_factory) -> Iterator[WorkerProc]:
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = launch_worker(settings_env, log_path, "carcert-test-main")
    yield worker
    worker.stop()


@pytest.fixture
def start_worker(settings_env: dict[str, str], tmp_path) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(name: str = "extra", **extra_env: str) -> WorkerProc:
        w = launch_worker({**settings_env, **extra_env}, tmp_path / f"{name}.log", f"carcert-test-{name}")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


# ------------------------------------------------------------------------------------------ database


@pytest.fixture
def db(settings_env: dict[str, str]) -> Iterator[Any]:
    from store.db import get_sessionmaker

    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


@pytest.fixture
def tenant(settings_env: dict[str, str]) -> Iterator[str]:
    """A fresh tenant; its unfinished jobs (and those of tenants named tenant + suffix) are
    cancelled afterwards so no worker picks them up."""
    from sqlalchemy import update

    from store.db import session_scope
    from store.models import Job, utcnow

    name = f"tenant-{uuid.uuid4().hex[:10]}"
    yield name
    with session_scope() as s:
        s.execute(
            update(Job)
            .where(Job.tenant.startswith(name), Job.status.in_(("queued", "running")))
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
        )
