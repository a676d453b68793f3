"""The deployment commands of docker-compose.yml against real servers: `carcert keys create
--if-none` and `carcert bootstrap` on a fresh Postgres database (and a real S3 server on loopback
for the bucket), `carcert health worker` against a real Celery worker on Redis and against the job
lease a busy worker holds in Postgres."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from carcert.cli import main
from carcert.cli_service import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def env(monkeypatch) -> Iterator[pytest.MonkeyPatch]:
    """monkeypatch whose CARCERT_* changes reach the cached settings and engines."""
    from store.db import get_engine, reset_caches

    reset_caches()
    yield monkeypatch
    get_engine().dispose()
    monkeypatch.undo()
    reset_caches()


@pytest.fixture
def empty_db(fresh_pg_db, env) -> Iterator[str]:
    """A fresh, not migrated Postgres database, configured as CARCERT_DATABASE_URL."""
    from store.db import reset_caches

    with fresh_pg_db() as url:
        env.setenv("CARCERT_DATABASE_URL", url)
        reset_caches()
        yield url
        from store.db import get_engine

        get_engine().dispose()


def _keys() -> list[tuple[str, str, bool]]:
    from sqlalchemy import select

    from store.db import session_scope
    from store.models import ApiKey

    with session_scope() as s:
        rows = s.execute(select(ApiKey.tenant, ApiKey.name, ApiKey.revoked_at)).all()
    return [(t, n, r is not None) for t, n, r in rows]


def _authenticates(key: str) -> str | None:
    from store.db import session_scope
    from store.keys import authenticate

    with session_scope() as s:
        return authenticate(s, key)


# ------------------------------------------------------------------------------- keys --if-none


def test_keys_create_if_none_creates_one_key_only_while_none_exists(empty_db, capsys):
    from sqlalchemy import select

    from store.db import session_scope
    from store.keys import revoke_api_key
    from store.models import ApiKey

    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--if-none", "--tenant", "admin"]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("cc_") and _authenticates(first) == "admin"

    assert main(["keys", "create", "--if-none", "--tenant", "other"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "none created" in out.err
    assert _keys() == [("admin", "", False)]

    # without --if-none a key is always created; revoked keys do not count for --if-none
    assert main(["keys", "create", "--tenant", "team-a"]) == 0
    second = capsys.readouterr().out.strip()
    assert _authenticates(second) == "team-a"
    with session_scope() as s:
        for row in s.scalars(select(ApiKey)).all():
            assert revoke_api_key(s, row.tenant, row.id)
    assert main(["keys", "create", "--if-none", "--tenant", "admin"]) == 0
    third = capsys.readouterr().out.strip()
    assert _authenticates(third) == "admin" and _authenticates(first) is None
    assert sorted(_keys()) == [("admin", "", False), ("admin", "", True), ("team-a", "", True)]


# ----------------------------------------------------------------------------------- bootstrap


def test_bootstrap_migrates_and_prints_the_first_key_once(empty_db, env, tmp_path, capsys):
    from sqlalchemy import inspect

    from store.db import get_engine

    env.setenv("CARCERT_ARTIFACT_BACKEND", "local")
    env.setenv("CARCERT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    assert "jobs" not in inspect(get_engine()).get_table_names()

    assert main(["bootstrap", "--tenant", "ops"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line for line in lines if line.startswith("cc_")]
    assert len(keys) == 1 and _authenticates(keys[0]) == "ops"
    assert "jobs" in inspect(get_engine()).get_table_names()
    assert _keys() == [("ops", "bootstrap", False)]

    # the second start (a restarted stack) changes nothing and prints no key
    assert main(["bootstrap", "--tenant", "ops"]) == 0
    out = capsys.readouterr().out
    assert "cc_" not in out and "none created" in out
    assert _keys() == [("ops", "bootstrap", False)]


def test_bootstrap_creates_the_s3_bucket(empty_db, env, tmp_path, capsys):
    moto_server = pytest.importorskip("moto.server", reason="moto[s3] + flask (dev extra)")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        bucket = f"carcert-{uuid.uuid4().hex[:8]}"
        env.setenv("CARCERT_ARTIFACT_BACKEND", "s3")
        env.setenv("CARCERT_S3_BUCKET", bucket)
        env.setenv("CARCERT_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("CARCERT_ARTIFACT_ROOT", str(tmp_path / "cache"))
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]

        assert main(["bootstrap"]) == 0
        assert f"bucket {bucket!r} created" in capsys.readouterr().out
        assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
        client.put_object(Bucket=bucket, Key="artifacts/x", Body=b"kept")

        assert main(["bootstrap"]) == 0
        assert f"bucket {bucket!r} exists" in capsys.readouterr().out
        assert client.get_object(Bucket=bucket, Key="artifacts/x")["Body"].read() == b"kept"
        assert _keys() == [("admin", "bootstrap", False)]
    finally:
        server.stop()


# ------------------------------------------------------------------------------ health worker


@pytest.fixture
def idle_broker(env) -> Iterator[str]:
    """A Redis database number nobody uses (no worker listens on it), as CARCERT_BROKER_URL."""
    import redis

    from tests.integration.conftest import REDIS_BASE_URL

    marker = f"carcert-health-{uuid.uuid4().hex}"
    for n in range(1, 16):
        r = redis.Redis.from_url(f"{REDIS_BASE_URL}/{n}")
        if r.dbsize() == 0 and r.set("carcert:test:owner", marker, nx=True):
            env.setenv("CARCERT_BROKER_URL", f"{REDIS_BASE_URL}/{n}")
            yield f"{REDIS_BASE_URL}/{n}"
            r.flushdb()
            return
    pytest.skip("no empty Redis database number available")


def test_health_worker_answers_from_a_running_worker(settings_env, idle_broker, start_worker, capsys):
    worker = start_worker("health", CARCERT_BROKER_URL=idle_broker)  # the only worker on that broker
    assert main(["health", "worker", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("worker healthy: pong from") and "carcert-test-health@" in out
    worker.stop()
    assert main(["health", "worker", "--timeout", "1"]) == 1


def test_health_worker_fails_without_a_worker_and_sees_a_busy_one(empty_db, idle_broker, capsys):
    from celery.utils.nodenames import gethostname

    from store.db import session_scope
    from store.models import Job
    from tests.integration.service_helpers import claimed_job

    assert main(["migrate"]) == 0
    assert main(["health", "worker", "--timeout", "1"]) == 1
    assert "no worker on this host" in capsys.readouterr().err

    # a solo-pool worker busy with a job answers no ping; the lease its heartbeat renews counts
    job_id = claimed_job(worker=f"{gethostname()}:{os.getpid()}:abcd1234")
    assert main(["health", "worker", "--timeout", "1"]) == 0
    assert f"busy: holds the lease of running job(s) {job_id}" in capsys.readouterr().out

    with session_scope() as s:  # the heartbeat stopped: the lease runs out
        job = s.get(Job, job_id)
        job.lease_expires_at = job.lease_expires_at - timedelta(hours=1)
    assert main(["health", "worker", "--timeout", "1"]) == 1

    with session_scope() as s:  # a lease held by another host is not this worker's
        job = s.get(Job, job_id)
        job.lease_owner = "elsewhere:1:abcd1234"
        job.lease_expires_at = job.lease_expires_at + timedelta(hours=2)
    assert main(["health", "worker", "--timeout", "1"]) == 1


def test_health_worker_fails_when_the_broker_is_unreachable(empty_db, env, capsys):
    env.setenv("CARCERT_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["migrate"]) == 0
    t0 = time.monotonic()
    assert main(["health", "worker", "--timeout", "1"]) == 1
    assert time.monotonic() - t0 < 15  # one retry, no endless reconnecting
    err = capsys.readouterr().err
    assert err.startswith("worker unhealthy: OperationalError") and "refused" in err.lower()
