"""Job units: a job spread over workers. Every function takes a Session and leaves commit to the
caller (store.db.session_scope), except claim_unit (commits, like store.jobs.claim_job).

Life cycle: the worker that claimed the job runs its shared part (a sweep's pretraining), then
fan_out() inserts one queued unit per piece (a variant; or a certification's shards and MERGE_UNIT,
which is claimable only once every other unit succeeded) and hands the job's lease to the units
(lease_owner FANOUT_OWNER, no expiry: the job-level stale sweep leaves it alone). Each unit is
claimed, leased, renewed and finished like a job (claim_unit, unit_progress, finish_unit); the
transaction that records the last unit's success also finishes the job (complete_job_if_done, with
the job row locked so two units finishing together cannot both miss it, nor both do it). A failed
unit fails the job; a cancel request stops every unit (unit_progress / check_unit report it) and
settle_cancel finishes the job as cancelled. Each unit keeps the queue it was fanned out on (that of
the worker running the job), so it is re-sent there whichever worker's sweep finds it stale (a unit
of a GPU queue never lands on a CPU worker, and its bytes never depend on which worker swept it).
stale_units() returns the units to dispatch again: queued
and untouched for settings.queued_stale_seconds (a lost message) or running with an expired lease (a
dead worker: only its unit is redone, from its checkpoints); a unit that already used
settings.max_attempts fails the job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.spec import JobSpec
from core.work import shared_fraction
from store.jobs import LeaseLost, finish_job, lease_until, renew_held
from store.models import FINAL_STATUSES, Job, JobUnit, utcnow
from store.settings import get_settings

FANOUT_OWNER = "units"  # the jobs.lease_owner of a job whose units run it
MERGE_UNIT = "certify"  # a split certification's last unit: claimable once its shards succeeded


def fan_out(s: Session, job_id: str, worker_id: str, names: list[str], queue: str | None = None
            ) -> list[tuple[str, str | None]]:
    """Create the job's queued units `names` on `queue` (in that order; kept if a previous attempt
    created them) and hand the job's lease from `worker_id` to them. Returns (id, queue) of the units
    not yet succeeded, to dispatch. Raises LeaseLost when `worker_id` no longer holds the running job."""
    now = utcnow()
    spec = s.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
        .values(lease_owner=FANOUT_OWNER, lease_expires_at=None, stage=f"0/{len(names)} units done",
                progress=job_fraction(spec, [0.0]) if spec else 0.0, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise LeaseLost(job_id)
    existing = {u.name: u for u in units_of(s, job_id)}
    for pos, name in enumerate(names):
        if name not in existing:
            s.add(JobUnit(job_id=job_id, name=name, position=pos, status="queued", progress=0.0, attempts=0,
                          queue=queue, created_at=now, updated_at=now))
    s.flush()
    return [(u.id, u.queue) for u in units_of(s, job_id) if u.status != "succeeded"]


def unit_queue(s: Session, unit_id: str) -> str | None:
    """The queue unit `unit_id` is dispatched to (None: the sender's settings.queue)."""
    return s.scalar(select(JobUnit.queue).where(JobUnit.id == unit_id))


def units_of(s: Session, job_id: str) -> list[JobUnit]:
    """The job's units in fan-out order ([] for a job run by one worker)."""
    return list(s.scalars(select(JobUnit).where(JobUnit.job_id == job_id).order_by(JobUnit.position)))


def claim_unit(s: Session, unit_id: str, worker_id: str) -> JobUnit | None:
    """Atomically take a unit: queued, or running with an expired lease, of a running job handed to
    its units and not cancel-requested. Sets status running, the lease, attempts += 1. Commits.
    None when not claimable (finished, held by a live worker, job cancelled or finished)."""
    now = utcnow()
    live_job = (
        select(Job.id)
        .where(Job.id == JobUnit.job_id, Job.status == "running", Job.lease_owner == FANOUT_OWNER,
               Job.cancel_requested.is_(False))
        .exists()
    )
    other = JobUnit.__table__.alias("other")
    pending_shards = (  # the merge unit waits for every other unit of its job
        select(other.c.id)
        .where(other.c.job_id == JobUnit.job_id, other.c.id != JobUnit.id, other.c.status != "succeeded")
        .exists()
    )
    res = s.execute(
        update(JobUnit)
        .where(
            JobUnit.id == unit_id,
            or_(JobUnit.status == "queued",
                and_(JobUnit.status == "running", JobUnit.lease_expires_at < now)),
            live_job,
            or_(JobUnit.name != MERGE_UNIT, ~pending_shards),
        )
        .values(status="running", lease_owner=worker_id, lease_expires_at=lease_until(now),
                attempts=JobUnit.attempts + 1, updated_at=now, started_at=now)
        .execution_options(synchronize_session=False)
    )
    s.commit()
    if res.rowcount != 1:
        return None
    unit = s.get(JobUnit, unit_id)
    if unit is not None:
        s.refresh(unit)
    return unit


def _job_stopping(s: Session, job_id: str) -> bool:
    row = s.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one_or_none()
    return row is None or row.status in FINAL_STATUSES or bool(row.cancel_requested)


def unit_progress(
    s: Session, unit_id: str, worker_id: str, stage: str | None = None, progress: float | None = None
) -> bool:
    """Record the unit's stage/progress (when given), renew its lease and set the job's progress to
    the mean of its units'. Returns whether the unit must stop (job cancel-requested or finished).
    Raises LeaseLost when `worker_id` no longer holds the running unit."""
    now = utcnow()
    renew_held(s, JobUnit, unit_id, worker_id, stage, progress, now)
    job_id = s.scalar(select(JobUnit.job_id).where(JobUnit.id == unit_id))
    if progress is not None:
        _job_progress(s, job_id, now)
    return _job_stopping(s, job_id)


def job_fraction(spec: dict[str, Any], unit_fractions: list[float]) -> float:
    """A spread job's overall progress: its shared part (core.work.shared_fraction, done before the
    fan-out) plus the rest in proportion to the mean of its units' progress."""
    share = shared_fraction(JobSpec.model_validate(spec))
    mean = sum(unit_fractions) / len(unit_fractions) if unit_fractions else 0.0
    return share + (1.0 - share) * mean


def _job_progress(s: Session, job_id: str, now: datetime) -> None:
    rows = s.execute(select(JobUnit.status, JobUnit.progress).where(JobUnit.job_id == job_id)).all()
    spec = s.scalar(select(Job.spec).where(Job.id == job_id))
    if not rows or spec is None:
        return
    done = sum(r.status == "succeeded" for r in rows)
    value = job_fraction(spec, [1.0 if r.status == "succeeded" else r.progress for r in rows])
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(progress=func.max(Job.progress, value) if s.bind.dialect.name == "sqlite"
                else func.greatest(Job.progress, value),
                stage=f"{done}/{len(rows)} units done", updated_at=now)
        .execution_options(synchronize_session=False)
    )


def check_unit(s: Session, unit_id: str, worker_id: str) -> bool:
    """Read-only twin of unit_progress for frequent cancel checks (LeaseLost when not held)."""
    row = s.execute(
        select(JobUnit.status, JobUnit.lease_owner, JobUnit.job_id).where(JobUnit.id == unit_id)
    ).one_or_none()
    if row is None or row.status != "running" or row.lease_owner != worker_id:
        raise LeaseLost(unit_id)
    return _job_stopping(s, row.job_id)


def renew_unit(s: Session, unit_id: str, worker_id: str) -> bool:
    """Extend the unit's lease only; returns whether it must stop (LeaseLost if lost)."""
    return unit_progress(s, unit_id, worker_id)


def finish_unit(
    s: Session, unit_id: str, worker_id: str | None, status: str, result: dict[str, Any] | None = None
) -> bool:
    """Move a unit to a final status (with its result), releasing its lease; with `worker_id` only
    while that worker holds it. Returns whether it changed."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"final status must be one of {FINAL_STATUSES}")
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "lease_owner": None,
                              "lease_expires_at": None, "result": result}
    if status == "succeeded":
        values.update(progress=1.0, stage="done")
    stmt = update(JobUnit).where(JobUnit.id == unit_id, JobUnit.status.not_in(FINAL_STATUSES))
    if worker_id is not None:
        stmt = stmt.where(JobUnit.lease_owner == worker_id)
    return s.execute(stmt.values(**values).execution_options(synchronize_session=False)).rowcount == 1


def release_unit(s: Session, unit_id: str, worker_id: str) -> bool:
    """Give a running unit back (worker shutting down): queued, lease cleared, the attempt not
    counted. Only by its lease owner."""
    res = s.execute(
        update(JobUnit)
        .where(JobUnit.id == unit_id, JobUnit.lease_owner == worker_id, JobUnit.status == "running")
        .values(status="queued", lease_owner=None, lease_expires_at=None, updated_at=utcnow(),
                attempts=JobUnit.attempts - 1)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def _lock_fanned_job(s: Session, job_id: str) -> Job | None:
    """The job row locked (FOR UPDATE) if it is running and handed to its units, else None."""
    stmt = select(Job).where(Job.id == job_id).with_for_update()
    job = s.scalar(stmt.execution_options(populate_existing=True))
    if job is None or job.status != "running" or job.lease_owner != FANOUT_OWNER:
        return None
    return job


def complete_job_if_done(s: Session, job_id: str, summary_extra: dict[str, Any] | None = None) -> bool:
    """Finish the job as succeeded when every unit has; its summary is {"variants": each unit's
    result["variant"] in fan-out order, "seconds": since the job started, **summary_extra}. Call in
    the transaction that finished a unit, after finish_unit. Returns whether this call finished it."""
    job = _lock_fanned_job(s, job_id)
    if job is None:
        return False
    units = units_of(s, job_id)
    for u in units:
        s.refresh(u)
    if not units or any(u.status != "succeeded" for u in units):
        _job_progress(s, job_id, utcnow())
        return False
    seconds = (utcnow() - job.started_at).total_seconds() if job.started_at else None
    variants = [(u.result or {}).get("variant") for u in units]
    summary = {**(summary_extra or {}), "variants": [v for v in variants if v is not None],
               "seconds": seconds}
    return finish_job(s, job_id, "succeeded", summary=summary, worker_id=FANOUT_OWNER)


def stop_job(s: Session, job_id: str, status: str, error: dict[str, Any] | None = None) -> bool:
    """A unit failed (or saw the cancel): finish the fanned-out job with `status` and cancel its
    units not yet final (the running ones stop at their next check). Returns whether it changed."""
    if _lock_fanned_job(s, job_id) is None:
        return False
    finish_job(s, job_id, status, error=error, worker_id=FANOUT_OWNER)
    s.execute(
        update(JobUnit)
        .where(JobUnit.job_id == job_id, JobUnit.status.not_in(FINAL_STATUSES))
        .values(status="cancelled", finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return True


def stale_units(s: Session, now: datetime | None = None) -> list[tuple[str, str | None]]:
    """(id, queue) of the units to dispatch again (module docstring). Settles on the way: a
    fanned-out job with a cancel request becomes cancelled; a unit past settings.max_attempts fails
    its job. Touches the returned units' updated_at so the next sweep waits again."""
    cfg = get_settings()
    now = now or utcnow()
    for job_id in s.scalars(
        select(Job.id).where(Job.status == "running", Job.lease_owner == FANOUT_OWNER, Job.cancel_requested)
    ).all():
        stop_job(s, job_id, "cancelled")
    queued_before = now - timedelta(seconds=cfg.queued_stale_seconds)
    rows = list(
        s.scalars(
            select(JobUnit)
            .join(Job, Job.id == JobUnit.job_id)
            .where(
                Job.status == "running",
                Job.lease_owner == FANOUT_OWNER,
                or_(
                    and_(JobUnit.status == "queued", JobUnit.updated_at < queued_before),
                    and_(JobUnit.status == "running", JobUnit.lease_expires_at < now),
                ),
            )
            .order_by(JobUnit.created_at)
            .limit(1000)
            .with_for_update(skip_locked=True, of=JobUnit)
        )
    )
    out = []
    for unit in rows:
        if unit.status == "running" and unit.attempts >= cfg.max_attempts:
            detail = f"the worker running unit {unit.name} stopped {unit.attempts} times; giving up"
            stop_job(s, unit.job_id, "failed", {"title": "Worker lost", "detail": detail})
            continue
        unit.updated_at = now
        out.append((unit.id, unit.queue))
    s.flush()
    return out


__all__ = ["check_unit", "claim_unit", "complete_job_if_done", "fan_out", "FANOUT_OWNER", "finish_unit",
           "job_fraction", "MERGE_UNIT", "release_unit", "renew_unit", "stale_units", "stop_job",
           "unit_progress", "unit_queue", "units_of"]
