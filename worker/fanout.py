"""A job spread over workers, the claiming worker's part: a sweep's shared pretraining, then one
unit per variant (store.units) dispatched as its own Celery task, which any worker runs
(worker.units.execute_unit, resuming a dead worker's variant from its checkpoints); the unit finishing
last finishes the job.

Checkpoints and the shared pretrained model live in settings.work_root/<job_id>/checkpoints, so the
workers of one job must share work_root (one host, or a shared volume in a cluster; docs/operations.md).
Each unit writes its variant folder under <job dir>/out as one uninterrupted run does
(core.pipeline.run_job(only=...)): same certificates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.context import ForwardingContext
from core.pipeline import certify_unit_names, run_job, variant_names
from core.spec import JobSpec
from store.db import session_scope
from store.jobs import LeaseLost
from store.settings import Settings
from store.units import fan_out
from worker.inputs import allowed_roots
from worker.queue import dispatch_unit

log = logging.getLogger("carcert.worker")


class _Scaled(ForwardingContext):
    """The parent's context with progress scaled to the shared part's share of the job."""

    def __init__(self, ctx: Any, share: float) -> None:
        super().__init__(ctx)
        self.share = share

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        if stage != "done":  # the job is not done when its shared part is
            self.ctx.progress(stage, fraction * self.share, message)


def unit_names(spec: JobSpec) -> list[str]:
    """The units of a job spread over workers: a sweep's variants, or a split certification's shards
    and its merge (core.pipeline.certify_unit_names); [] when one worker runs it all."""
    if spec.kind == "certify":
        return certify_unit_names(spec)
    names = variant_names(spec)
    return names if len(names) > 1 else []


def spreads(spec: JobSpec, settings: Settings) -> bool:
    """Whether the job runs as units (unit_names), settings.fan_out on, and no MLflow tracking (which
    logs the whole job from one worker)."""
    return settings.fan_out and not settings.mlflow_tracking_uri and bool(unit_names(spec))


def start_units(job_id: str, worker_id: str, resolved: JobSpec, job_dir: Path, ctx: Any,
                device: str | None) -> str:
    """The parent's part: the shared pretraining (checkpoint "pretrain" in the job folder), then one
    unit per variant, dispatched. Returns "fanned-out" ("lost" when the lease went meanwhile)."""
    from core.work import shared_fraction

    if resolved.kind == "prune":  # a certification's shards share nothing to compute first
        run_job(resolved, job_dir / "out", _Scaled(ctx, shared_fraction(resolved)), device=device,
                job_id=job_id, allowed_roots=allowed_roots(ctx.settings, job_dir), only=[])
    ctx.stop_writes()
    if ctx.lease_lost:
        return "lost"
    try:
        with session_scope() as s:
            ids = fan_out(s, job_id, worker_id, unit_names(resolved), queue=ctx.settings.queue)
    except LeaseLost:
        return "lost"
    for unit_id, queue in ids:
        dispatch_unit(unit_id, queue)
    log.info("job %s: shared part done, %d unit(s) dispatched", job_id, len(ids))
    return "fanned-out"


__all__ = ["spreads", "start_units", "unit_names"]
