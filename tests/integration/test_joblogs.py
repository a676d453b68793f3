"""A job's own log (store.joblogs, worker.joblog) on a real Postgres: writers of one job on several
threads (a sweep's units run on several workers) number their lines 1..N without a collision or a
gap, the bound settings.job_log_max_lines holds across writers, and a recorder prefixes its lines
and sums up what it could not keep."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest

from core.spec import JobSpec
from store import jobs as repo
from store.db import session_scope
from store.joblogs import append_lines, read_lines
from worker.joblog import JobLogRecorder

pytestmark = pytest.mark.integration


def _job(tenant: str) -> str:
    with session_scope() as s:
        job, _ = repo.create_job(s, tenant, JobSpec(train_subset=100))
        return job.id


def _lines(job_id: str) -> list[tuple[int, str]]:
    with session_scope() as s:
        return [(row.seq, row.message) for row in read_lines(s, job_id, limit=10_000)]


def _write_concurrently(job_id: str, writers: int, batches: int, size: int, max_lines: int | None) -> int:
    dropped: list[int] = []
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        start.wait()
        for b in range(batches):
            batch = [(datetime.now(UTC), "INFO", f"w{w} b{b} i{i}") for i in range(size)]
            with session_scope() as s:
                dropped.append(append_lines(s, job_id, batch, max_lines))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sum(dropped)


def test_concurrent_writers_number_lines_without_collisions(tenant) -> None:
    job_id = _job(tenant)
    assert _write_concurrently(job_id, writers=4, batches=6, size=5, max_lines=None) == 0
    lines = _lines(job_id)
    assert [seq for seq, _ in lines] == list(range(1, 4 * 6 * 5 + 1))
    for w in range(4):  # each writer's lines keep their order, a batch stays contiguous
        mine = [m for _, m in lines if m.startswith(f"w{w} ")]
        assert mine == [f"w{w} b{b} i{i}" for b in range(6) for i in range(5)]
        first = [seq for seq, m in lines if m == f"w{w} b0 i0"][0]
        assert [m for _, m in lines[first - 1:first + 4]] == [f"w{w} b0 i{i}" for i in range(5)]


def test_the_bound_holds_across_writers(tenant) -> None:
    job_id = _job(tenant)
    assert _write_concurrently(job_id, writers=3, batches=4, size=5, max_lines=23) == 3 * 4 * 5 - 23
    assert [seq for seq, _ in _lines(job_id)] == list(range(1, 24))


def test_recorder_prefixes_its_lines_and_sums_up_the_rest(tenant) -> None:
    job_id = _job(tenant)
    log = logging.getLogger("carcert.test-joblog")
    with session_scope() as s:
        append_lines(s, job_id, [(datetime.now(UTC), "INFO", "an earlier attempt")])
    with JobLogRecorder(job_id, max_lines=10, prefix="[car-0.50] ") as rec:
        for i in range(6):
            log.info("line %d", i)
        rec.flush()
        for i in range(6, 25):
            log.info("line %d", i)
        threading.Thread(target=log.info, args=("another thread, another job",)).start()
    lines = _lines(job_id)
    assert [m for _, m in lines] == ["an earlier attempt", *[f"[car-0.50] line {i}" for i in range(9)],
                                     "[car-0.50] 16 more log line(s) not kept (CARCERT_JOB_LOG_MAX_LINES=10)"]
    assert [seq for seq, _ in lines] == list(range(1, 12))
