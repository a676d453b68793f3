"""Worker heartbeats (table worker_beats): each worker node's sweep loop records that it is alive;
/metrics counts the nodes seen recently."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from store.models import WorkerBeat, utcnow


def beat(s: Session, worker_id: str) -> None:
    """Record that `worker_id` is alive now (one row per worker, updated in place)."""
    row = s.get(WorkerBeat, worker_id[:200])
    if row is None:
        s.add(WorkerBeat(id=worker_id[:200], last_seen=utcnow()))
    else:
        row.last_seen = utcnow()
    s.flush()


def live_workers(s: Session, within_s: float) -> int:
    """How many workers beat within the last `within_s` seconds."""
    since = utcnow() - timedelta(seconds=within_s)
    return int(
        s.scalar(select(func.count()).select_from(WorkerBeat).where(WorkerBeat.last_seen >= since)) or 0
    )


def forget_workers(s: Session, older_than_s: float) -> int:
    """Drop the rows of workers silent for longer than `older_than_s` seconds; how many."""
    since = utcnow() - timedelta(seconds=older_than_s)
    return int(s.execute(delete(WorkerBeat).where(WorkerBeat.last_seen < since)).rowcount or 0)
