"""Webhook delivery records on the jobs table (the sending is worker.webhooks).

A job submitted with `webhook` starts with webhook_state "pending". Once the job has a final
status, one worker claims the delivery (state "sending" with a lease, webhook_lease_until, so a
worker that dies mid-delivery leaves it to the next sweep), sends the event with retries and
records the outcome: "delivered" or "failed", with attempts, last status code / error and times
in webhook_delivery. Functions take a Session and leave commit to the caller."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from store.jobs import fresh_job
from store.models import FINAL_STATUSES, Job, utcnow

WEBHOOK_STATES = ("pending", "sending", "delivered", "failed")


def _due(now: datetime) -> Any:
    """SQL condition: a final job whose delivery is pending, or was being sent by a worker whose
    lease on it expired."""
    return and_(
        Job.status.in_(FINAL_STATUSES),
        or_(
            Job.webhook_state == "pending",
            and_(Job.webhook_state == "sending", Job.webhook_lease_until < now),
        ),
    )


def claim_delivery(s: Session, job_id: str, lease_s: float) -> Job | None:
    """Take the delivery of `job_id` (one conditional UPDATE: of two claims exactly one wins); the
    job, or None when it is not due (no webhook, not final, delivered, or another worker has it)."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, _due(now))
        .values(webhook_state="sending", webhook_lease_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return fresh_job(s, job_id) if res.rowcount == 1 else None


def record_delivery(s: Session, job_id: str, state: str, delivery: dict[str, Any]) -> None:
    """Store the delivery record (attempts, status_code, error, last_attempt_at, delivered_at) and
    its state ("sending" while retrying, then "delivered" or "failed")."""
    if state not in WEBHOOK_STATES:
        raise ValueError(f"webhook state must be one of {WEBHOOK_STATES}")
    values: dict[str, Any] = {"webhook_state": state, "webhook_delivery": delivery}
    if state != "sending":
        values["webhook_lease_until"] = None
    s.execute(
        update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
    )


def due_deliveries(s: Session, limit: int = 50) -> list[str]:
    """Ids of final jobs whose webhook is due (oldest finished first)."""
    stmt = select(Job.id).where(_due(utcnow())).order_by(Job.finished_at).limit(limit)
    return list(s.scalars(stmt))
