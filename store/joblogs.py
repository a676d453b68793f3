"""A job's own log lines (table job_logs, numbered per job by seq): written by the workers
(worker.joblog: the job's worker, or each of its units' workers), read by GET /jobs/{id}/logs. At
most settings.job_log_max_lines per job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import Job, JobLog


def next_seq(s: Session, job_id: str) -> int:
    """The seq the job's next line gets (lines of earlier attempts keep theirs)."""
    return int(s.scalar(select(func.max(JobLog.seq)).where(JobLog.job_id == job_id)) or 0) + 1


def append_lines(s: Session, job_id: str, lines: list[tuple[datetime, str, str]],
                 max_lines: int | None = None) -> int:
    """Insert (created_at, level, message) lines after the job's last line, keeping the job's log at
    most `max_lines` lines long (None: no bound); returns how many of `lines` were not kept. The job
    row is locked first (SELECT ... FOR UPDATE; SQLite serialises writers anyway), so the writers of
    one job (its units on several workers, a webhook delivery) never give two lines one seq."""
    s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    first = next_seq(s, job_id)
    keep = len(lines) if max_lines is None else max(0, min(len(lines), max_lines - (first - 1)))
    for i, (when, level, message) in enumerate(lines[:keep]):
        s.add(JobLog(job_id=job_id, seq=first + i, created_at=when, level=level[:10], message=message[:2000]))
    s.flush()
    return len(lines) - keep


def read_lines(s: Session, job_id: str, after: int = 0, limit: int = 1000) -> list[JobLog]:
    """The job's lines with seq > `after`, in order (the caller checks the tenant first)."""
    stmt = select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after).order_by(JobLog.seq).limit(limit)
    return list(s.scalars(stmt))
