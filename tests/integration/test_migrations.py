"""Alembic: empty -> head creates exactly the ORM schema, head -> base removes it, on Postgres and
SQLite; `carcert migrate` does the same from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from store.db import downgrade_db, init_db, make_engine
from store.models import Base
from tests.integration.service_helpers import ROOT, python_env

pytestmark = pytest.mark.integration

TABLES = {"api_keys", "artifacts", "jobs", "job_results", "job_labels", "job_logs", "worker_beats",
          "job_units"}


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _revision(engine) -> str | None:
    with engine.connect() as c:
        return MigrationContext.configure(c).get_current_revision()


def _roundtrip(url: str) -> None:
    engine = make_engine(url)
    try:
        assert _tables(engine) == set()
        init_db(engine)
        assert _tables(engine) == TABLES == set(Base.metadata.tables)
        assert _revision(engine) == "0004_unit_queue"
        with engine.connect() as c:  # the migration creates what the models declare, nothing else
            assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
        init_db(engine)  # idempotent at head
        downgrade_db(engine, "base")
        assert _tables(engine) == set()
        assert _revision(engine) is None
        init_db(engine)  # and up again
        assert _tables(engine) == TABLES
    finally:
        engine.dispose()


def test_postgres_upgrade_downgrade_roundtrip(fresh_pg_db):
    with fresh_pg_db() as url:
        _roundtrip(url)


def test_sqlite_upgrade_downgrade_roundtrip(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'nested' / 'carcert.db'}")


def test_postgres_constraints_exist(fresh_pg_db):
    """The unique idempotency key and the status check are enforced by the database itself."""
    with fresh_pg_db() as url:
        engine = make_engine(url)
        init_db(engine)
        insert = text(
            "INSERT INTO jobs (id, tenant, kind, spec, status, progress, request_hash, created_at,"
            " updated_at, attempts, cancel_requested, idempotency_key) VALUES (:id, 't', 'prune', '{}',"
            " :status, 0, 'h', now(), now(), 0, false, :key)"
        )
        with engine.begin() as c:
            c.execute(insert, {"id": "a", "status": "queued", "key": "k"})
        with pytest.raises(Exception, match="uq_jobs_tenant_idempotency_key"), engine.begin() as c:
            c.execute(insert, {"id": "b", "status": "queued", "key": "k"})
        with pytest.raises(Exception, match="ck_jobs_status"), engine.begin() as c:
            c.execute(insert, {"id": "c", "status": "exploded", "key": "other"})
        engine.dispose()


def test_cli_migrate_and_downgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = python_env({"CARCERT_DATABASE_URL": url})
    up = subprocess.run(
        [sys.executable, "-m", "carcert.cli", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    engine = make_engine(url)
    assert _tables(engine) == TABLES
    down = subprocess.run(
        [sys.executable, "-m", "carcert.cli", "migrate", "--downgrade", "base"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert _tables(engine) == set()
    engine.dispose()


def test_lifecycle_upgrade_keeps_existing_jobs(tmp_path):
    """0001 -> 0002_lifecycle on a database holding a job: the job survives with no name, no labels
    and no webhook state, and the downgrade back to 0001 keeps it too."""
    engine = make_engine(f"sqlite:///{tmp_path / 'up.db'}")
    try:
        init_db(engine)
        downgrade_db(engine, "0001_initial")
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO jobs (id, tenant, kind, spec, status, progress, request_hash, created_at,"
                    " updated_at, attempts, cancel_requested) VALUES ('old', 't', 'prune', '{}', 'succeeded',"
                    " 1, 'h', '2026-01-01', '2026-01-01', 1, 0)"
                )
            )
        init_db(engine)
        with engine.connect() as c:
            query = "SELECT name, webhook_state, stage_seconds FROM jobs WHERE id = 'old'"
            row = c.execute(text(query)).one()
            assert tuple(row) == (None, None, None)
            assert c.execute(text("SELECT count(*) FROM job_labels")).scalar_one() == 0
        downgrade_db(engine, "0001_initial")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
    finally:
        engine.dispose()
