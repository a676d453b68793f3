"""A job's own log lines (table job_logs, numbered per job by seq): written by the worker
(worker.joblog), read by GET /jobs/{id}/logs. At most settings.job_log_max_lines per job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import JobLog


def next_seq(s: Session, job_id: str) -> int:
    """The seq the job's next line gets (lines of earlier attempts keep theirs)."""
    return int(s.scalar(select(func.max(JobLog.seq)).where(JobLog.job_id == job_id)) or 0) + 1


def append_lines(s: Session, job_id: str, first_seq: int, lines: list[tuple[datetime, str, str]]) -> None:
    """Insert (created_at, level, message) lines numbered first_seq, first_seq + 1, ..."""
    for i, (when, level, message) in enumerate(lines):
        s.add(
            JobLog(
                job_id=job_id, seq=first_seq + i, created_at=when, level=level[:10], message=message[:2000]
            )
        )
    s.flush()


def read_lines(s: Session, job_id: str, after: int = 0, limit: int = 1000) -> list[JobLog]:
    """The job's lines with seq > `after`, in order (the caller checks the tenant first)."""
    stmt = select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after).order_by(JobLog.seq).limit(limit)
    return list(s.scalars(stmt))
