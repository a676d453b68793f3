"""A job's own log lines (table job_logs, numbered per job by seq): written by the workers
(worker.joblog: the job's worker, or each of its units' workers), read by GET /jobs/{id}/logs. At
most settings.job_log_max_lines per job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.models import JobLog

_RENUMBER_TRIES = 50  # concurrent writers of one job: each retry numbers after the winner's lines


def next_seq(s: Session, job_id: str) -> int:
    """The seq the job's next line gets (lines of earlier attempts keep theirs)."""
    return int(s.scalar(select(func.max(JobLog.seq)).where(JobLog.job_id == job_id)) or 0) + 1


def append_lines(s: Session, job_id: str, lines: list[tuple[datetime, str, str]],
                 max_lines: int | None = None) -> int:
    """Insert (created_at, level, message) lines after the job's last line, keeping the job's log at
    most `max_lines` lines long (None: no bound); returns how many of `lines` were not kept. Writers
    of one job (its units on several workers, a webhook delivery) may take the same next seq: the
    loser's insert meets the primary key (job_id, seq), is rolled back to a savepoint and numbered
    again. No lock is taken on the job row, so a writer cut off mid-transaction (a database outage)
    never blocks the job's progress and lease updates."""
    for _ in range(_RENUMBER_TRIES):
        first = next_seq(s, job_id)
        keep = len(lines) if max_lines is None else max(0, min(len(lines), max_lines - (first - 1)))
        try:
            with s.begin_nested():
                s.add_all(JobLog(job_id=job_id, seq=first + i, created_at=when, level=level[:10],
                                 message=message[:2000])
                          for i, (when, level, message) in enumerate(lines[:keep]))
        except IntegrityError:
            continue
        return len(lines) - keep
    raise RuntimeError(f"job {job_id}: could not number its log lines in {_RENUMBER_TRIES} tries")


def read_lines(s: Session, job_id: str, after: int = 0, limit: int = 1000) -> list[JobLog]:
    """The job's lines with seq > `after`, in order (the caller checks the tenant first)."""
    stmt = select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after).order_by(JobLog.seq).limit(limit)
    return list(s.scalars(stmt))
