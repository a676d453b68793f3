"""Per-job overhead fixes of the worker (bench/bench_job_overhead.py): progress writes happen on the
heartbeat thread (the pipeline never waits for a commit), the cancel check is read-only, and the
embedded SQLAlchemy broker is polled every settings.broker_poll_interval_s (not kombu's 1 s)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from store import jobs as repo
from store.db import get_engine, session_scope
from store.models import Job
from store.settings import get_settings
from tests.integration.service_helpers import claimed_job, job_row, sqlite_service
from worker.runner import DbStageContext

pytestmark = pytest.mark.integration


@pytest.fixture
def sqlite_env(tmp_path) -> Iterator[dict[str, str]]:
    with sqlite_service(tmp_path, CARCERT_LEASE_SECONDS="30", CARCERT_BROKER_POLL_INTERVAL_S="0.07") as env:
        yield env


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_progress_does_not_wait_for_the_database(sqlite_env, tmp_path):
    """With the database write-locked by someone else, progress() inside `with` still returns at
    once; the heartbeat thread writes the latest value as soon as the lock is gone."""
    job_id = claimed_job()
    db_file = sqlite_env["CARCERT_DATABASE_URL"].removeprefix("sqlite:///")
    with DbStageContext(job_id, "w1", tmp_path / "job", get_settings()) as ctx:
        blocker = sqlite3.connect(db_file, isolation_level=None, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: any UPDATE now waits
        try:
            t0 = time.monotonic()
            ctx.progress("pretrain", 0.1)
            ctx.progress("search", 0.4)  # a stage change: due at once, replaces the pending value
            elapsed = time.monotonic() - t0
            time.sleep(0.3)
            assert job_row(job_id).stage is None  # nothing could be written yet (reads still work: WAL)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert elapsed < 0.2, elapsed
        assert wait_until(lambda: job_row(job_id).stage == "search")
        assert job_row(job_id).progress == pytest.approx(0.4)
        assert not ctx.lease_lost and not ctx.should_cancel()


def test_stop_writes_drops_later_progress_and_the_race_with_finish_is_not_a_lost_lease(sqlite_env, tmp_path):
    job_id = claimed_job()
    writes: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            writes.append(statement)

    with DbStageContext(job_id, "w1", tmp_path / "job", get_settings()) as ctx:
        ctx.progress("certify", 0.9)
        assert wait_until(lambda: job_row(job_id).stage == "certify")
        event.listen(get_engine(), "before_cursor_execute", count)
        try:
            ctx.stop_writes()
            ctx.progress("done", 1.0)  # dropped: finish_job writes the final state
            time.sleep(0.2)
            assert writes == []
            with session_scope() as s:
                assert repo.finish_job(s, job_id, "succeeded", worker_id="w1")
            ctx._write("done", 1.0)  # a write that lost the race with finish_job
            assert not ctx.lease_lost
        finally:
            event.remove(get_engine(), "before_cursor_execute", count)
    j = job_row(job_id)
    assert (j.status, j.stage, j.progress) == ("succeeded", "done", 1.0)


def test_check_lease_reads_cancel_and_detects_a_lost_lease(sqlite_env):
    job_id = claimed_job("w1")
    with session_scope() as s:
        before = s.get(Job, job_id).updated_at
        assert repo.check_lease(s, job_id, "w1") is False
        with pytest.raises(repo.LeaseLost):
            repo.check_lease(s, job_id, "w2")
    assert job_row(job_id).updated_at == before  # read-only: nothing renewed
    with session_scope() as s:
        repo.request_cancel(s, "t", job_id)
    with session_scope() as s:
        assert repo.check_lease(s, job_id, "w1") is True
    with session_scope() as s:
        repo.finish_job(s, job_id, "cancelled")
    with session_scope() as s, pytest.raises(repo.LeaseLost):
        repo.check_lease(s, job_id, "w1")


def test_the_consumer_step_sets_the_sqla_polling_interval(sqlite_env):
    from worker.queue import BrokerPollInterval, make_celery

    app = make_celery(get_settings())
    assert BrokerPollInterval in app.steps["consumer"]

    class Consumer:  # what the step reads: the consumer's broker connection
        connection = app.connection_for_read()

    try:
        assert Consumer.connection.transport.polling_interval == 1.0  # kombu's default
        BrokerPollInterval(Consumer).start(Consumer)
        assert Consumer.connection.transport.polling_interval == pytest.approx(0.07)
    finally:
        Consumer.connection.release()
