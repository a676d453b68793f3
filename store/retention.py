"""Deleting jobs: one on request (DELETE /jobs/{id}) or every finished job older than
settings.retention_days (the workers' sweep). A job goes with its results, labels, log lines and the
artifacts it produced (model, mask, evidence, pruned program, pt2/ONNX exports); the artifacts it
used as inputs (uploads) stay, they belong to the tenant. Functions take a Session and leave commit
to the caller; the blobs are deleted by the caller after the commit (remove_blobs)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.models import FINAL_STATUSES, Artifact, Job, JobResult, utcnow

log = logging.getLogger("carcert.store")


def _produced_artifact_ids(s: Session, job_id: str) -> set[str]:
    ids: set[str] = set()
    for r in s.scalars(select(JobResult).where(JobResult.job_id == job_id)):
        ids.update(a for a in (r.model_artifact_id, r.mask_artifact_id, r.evidence_artifact_id) if a)
        for key in ("program_artifact_id", "pt2_artifact_id", "onnx_artifact_id", "examples_artifact_id"):
            produced = (r.metrics or {}).get(key)
            if isinstance(produced, str):
                ids.add(produced)
    return ids


def delete_job(s: Session, job: Job) -> list[str]:
    """Delete a finished job's rows and its produced artifacts' rows; the storage keys of their blobs
    (for remove_blobs after the commit). Raises ValueError for a job that has not finished."""
    if job.status not in FINAL_STATUSES:
        raise ValueError(f"job {job.id} is {job.status}; cancel it first")
    ids = _produced_artifact_ids(s, job.id)
    arts = (
        list(s.scalars(select(Artifact).where(Artifact.id.in_(ids), Artifact.tenant == job.tenant)))
        if ids
        else []
    )
    keys = [a.storage_key for a in arts]
    s.delete(job)  # results and labels by ORM cascade, log lines by the foreign key
    s.flush()
    for art in arts:
        s.delete(art)
    s.flush()
    return keys


def remove_blobs(store: ArtifactStore, keys: list[str]) -> None:
    """Delete blobs; one that cannot be deleted is logged, not raised (its row is gone already)."""
    for key in keys:
        try:
            store.delete(key)
        except Exception as exc:  # noqa: BLE001 - a stray blob must not fail the deletion
            log.warning("could not delete blob %s: %s", key, exc)


def expired_jobs(s: Session, days: float, limit: int = 100) -> list[Job]:
    """Finished jobs whose finished_at is more than `days` days ago (oldest first)."""
    before = utcnow() - timedelta(days=days)
    stmt = (
        select(Job)
        .where(Job.status.in_(FINAL_STATUSES), Job.finished_at < before)
        .order_by(Job.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)  # two workers' sweeps never delete the same job
    )
    return list(s.scalars(stmt))


def delete_expired_jobs(days: float | None = None) -> int:
    """The retention sweep: delete every finished job older than `days` (default
    settings.retention_days; None: keep everything) with its blobs; how many were deleted."""
    from store.artifacts import get_artifact_store
    from store.db import session_scope
    from store.settings import get_settings

    days = get_settings().retention_days if days is None else days
    if days is None:
        return 0
    deleted = 0
    while True:
        with session_scope() as s:
            jobs = expired_jobs(s, days, limit=100)
            keys = [k for job in jobs for k in delete_job(s, job)]
        remove_blobs(get_artifact_store(), keys)
        deleted += len(jobs)
        if len(jobs) < 100:
            return deleted
