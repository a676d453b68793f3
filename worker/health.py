"""Liveness of the Celery worker(s) on this host (`carcert health worker`, the compose healthcheck).

A worker counts as alive when either
- it answers a Celery `ping` broadcast (remote control over the broker), matched by node name
  `*@<this host name>` (the worker's node name is `carcert-<pid>@%h`, %h = this host name), or
- it holds the unexpired lease of a running job (lease_owner `<host>:<pid>:<hex>`, renewed by the
  job's heartbeat thread every lease_seconds / 3): a solo-pool worker runs the job in the thread
  that would answer the ping, so during a job the lease in the database is its heartbeat.
"""

from __future__ import annotations

from sqlalchemy import select

from store.db import session_scope
from store.models import Job, utcnow
from worker.queue import sender


def _hostname() -> str:
    from celery.utils.nodenames import gethostname

    return gethostname()


def ping_local(timeout: float, host: str | None = None) -> list[str]:
    """Node names of the workers on `host` (default: this host) that answered a ping in time.
    An unreachable broker raises (kombu's OperationalError) after one retry, it does not hang."""
    app = sender()  # the app for the current broker URL (it changes within one process in tests)
    host = host or _hostname()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=timeout)
        replies = app.control.ping(
            timeout=timeout, pattern=f"*@{host}", matcher="glob", limit=1, connection=conn
        )
    return sorted(name for reply in replies for name, answer in reply.items() if answer.get("ok") == "pong")


def leased_jobs(host: str | None = None) -> list[str]:
    """Ids of running jobs whose lease a worker on `host` holds and that has not expired."""
    host = host or _hostname()
    with session_scope() as s:
        rows = s.scalars(
            select(Job.id).where(
                Job.status == "running",
                Job.lease_owner.startswith(f"{host}:", autoescape=True),
                Job.lease_expires_at > utcnow(),
            )
        ).all()
    return list(rows)


def worker_alive(timeout: float = 5.0, host: str | None = None) -> str | None:
    """A one-line account of why a worker on this host is alive, or None when none is."""
    nodes = ping_local(timeout, host)
    if nodes:
        return f"pong from {', '.join(nodes)}"
    jobs = leased_jobs(host)
    if jobs:
        return f"busy: holds the lease of running job(s) {', '.join(jobs)}"
    return None
