"""One unit of a job spread over workers (worker.fanout, store.units): claimed and leased like a job,
it runs its variant (core.pipeline.run_job(only=[name])) from the job's shared checkpoints, stores the
variant's results, and finishes the job when it is the last; a failure fails the whole job.
Each unit resolves its inputs into <job dir>/units/<variant>/inputs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from core.errors import Cancelled, InvalidInput, TrainingDiverged
from core.pipeline import run_job
from core.spec import JobSpec
from store.artifacts import get_artifact_store
from store.db import session_scope
from store.jobs import LeaseLost
from store.models import Job
from store.settings import Settings, get_settings
from store.units import (
    MERGE_UNIT,
    check_unit,
    claim_unit,
    complete_job_if_done,
    finish_unit,
    release_unit,
    renew_unit,
    stop_job,
    unit_progress,
    unit_queue,
    units_of,
)
from worker.inputs import InputResolver, allowed_roots
from worker.joblog import JobLogRecorder
from worker.queue import dispatch_unit
from worker.runner import (
    DATABASE_ERRORS,
    DbStageContext,
    new_worker_id,
    persist_outputs,
    public_detail,
    ref_mapping,
)
from worker.shutdown import SHUTTING_DOWN
from worker.webhooks import deliver_in_background

log = logging.getLogger("carcert.worker")


class UnitLease:
    """The lease a unit's DbStageContext renews: the job_units row (store.units)."""

    update = staticmethod(unit_progress)
    check = staticmethod(check_unit)
    renew = staticmethod(renew_unit)


def execute_unit(unit_id: str, *, worker_id: str | None = None, settings: Settings | None = None,
                 device: str | None = None) -> str:
    """Run unit `unit_id` if it can be claimed: its variant (core.pipeline.run_job(only=[name])), its
    results stored, the job finished when it was the last. Returns the unit's final status, "skipped"
    (not claimable), "lost" (lease taken over) or "released" (worker shutting down)."""
    settings = settings or get_settings()
    worker_id = worker_id or new_worker_id()
    if SHUTTING_DOWN.is_set():
        with session_scope() as s:
            dispatch_unit(unit_id, unit_queue(s, unit_id))
        return "released"
    with session_scope() as s:
        unit = claim_unit(s, unit_id, worker_id)
        if unit is None:
            log.info("unit %s not claimable; skipped", unit_id)
            return "skipped"
        job = s.get(Job, unit.job_id)
        name, job_id, attempt = unit.name, unit.job_id, unit.attempts
        tenant, spec_json = job.tenant, job.spec
    job_dir = Path(settings.work_root).resolve() / job_id
    ended: list[bool] = []  # set when this unit's transaction finished the job
    # the unit's lines go to the job's own log (carcert logs), each prefixed by the variant's name
    with JobLogRecorder(job_id, settings.job_log_max_lines, prefix=f"[{name}] ") as joblog:
        log.info("job %s unit %s claimed by %s (attempt %d)", job_id, name, worker_id, attempt)
        with DbStageContext(job_id, worker_id, job_dir, settings, joblog, lease=UnitLease,
                            lease_id=unit_id) as ctx:
            try:
                status = _run_unit(unit_id, name, job_id, tenant, spec_json, worker_id, job_dir, ctx, device,
                                   ended)
            except Exception as exc:
                status = _unit_failure(exc, unit_id, job_id, worker_id, ctx, settings, ended)
        if status in ("succeeded", "failed", "cancelled"):
            log.info("job %s unit %s finished: %s", job_id, name, status)
        if ended:  # the transaction that ended this unit gave the job the same status
            log.info("job %s finished: %s (by unit %s)", job_id, status, name)
    if ended:  # the job's work folder goes, its webhook is sent (once: only one unit ends the job)
        shutil.rmtree(job_dir, ignore_errors=True)
        if spec_json.get("webhook"):
            deliver_in_background(job_id)
    return status


def _run_unit(unit_id: str, name: str, job_id: str, tenant: str, spec_json: dict[str, Any], worker_id: str,
              job_dir: Path, ctx: DbStageContext, device: str | None, ended: list[bool]) -> str:
    ctx.progress("preparing", 0.0)
    spec = JobSpec.model_validate(spec_json)
    store = get_artifact_store()
    with session_scope() as s:
        inputs = job_dir / "units" / name / "inputs"
        resolved = InputResolver(s, tenant, store, inputs, ctx.settings).resolve(spec)
    summary = run_job(resolved, job_dir / "out", ctx, device=device, job_id=job_id,
                      allowed_roots=allowed_roots(ctx.settings, job_dir), only=[name])
    refs = ref_mapping(spec, resolved)
    ctx.stop_writes()
    if ctx.lease_lost:
        return "lost"
    if not summary.get("variants"):  # a certification shard: its partial waits for the merge unit
        return _finish_shard(unit_id, job_id, worker_id)

    def finish(s: Any, restored: dict[str, Any]) -> bool:
        result = {"variant": restored["variants"][0], "dataset": restored.get("dataset")}
        if not finish_unit(s, unit_id, worker_id, "succeeded", result=result):
            return False
        if complete_job_if_done(s, job_id, {"dataset": restored.get("dataset"), "units": True}):
            ended.append(True)
        return True

    if not persist_outputs(job_id, tenant, worker_id, job_dir / "out", summary, store, refs, finish=finish):
        return "lost"
    return "succeeded"


def _finish_shard(unit_id: str, job_id: str, worker_id: str) -> str:
    """Mark a shard succeeded; when no other shard is left, dispatch the merge unit."""
    with session_scope() as s:
        if not finish_unit(s, unit_id, worker_id, "succeeded"):
            return "lost"
    with session_scope() as s:
        units = units_of(s, job_id)
        merge = [(u.id, u.queue) for u in units if u.name == MERGE_UNIT and u.status == "queued"]
        ready = all(u.status == "succeeded" for u in units if u.name != MERGE_UNIT)
    if merge and ready:
        dispatch_unit(*merge[0])
    return "succeeded"


def _unit_failure(exc: Exception, unit_id: str, job_id: str, worker_id: str, ctx: DbStageContext,
                  settings: Settings, ended: list[bool]) -> str:
    """What a unit that raised `exc` ends as; a failure the user can act on fails the whole job."""
    if isinstance(exc, LeaseLost) or (isinstance(exc, Cancelled) and ctx.lease_lost):
        return "lost"
    if isinstance(exc, Cancelled) and SHUTTING_DOWN.is_set() and not ctx.cancel_requested:
        with session_scope() as s:
            released = release_unit(s, unit_id, worker_id)
            queue = unit_queue(s, unit_id)
        if released:
            dispatch_unit(unit_id, queue)
        return "released"
    if isinstance(exc, DATABASE_ERRORS):
        log.warning("job %s unit %s: database error, the stale sweep retries it: %s", job_id, unit_id, exc)
        return "lost"
    if isinstance(exc, Cancelled):
        status, error = "cancelled", None
        if ctx.timed_out:
            status, error = "failed", {"title": "Time limit exceeded",
                                       "detail": f"the job ran longer than {settings.job_time_limit_s} s"}
    elif isinstance(exc, InvalidInput):
        status, error = "failed", {"title": "Invalid input", "detail": public_detail(str(exc), settings)}
    elif isinstance(exc, TrainingDiverged):
        detail = public_detail(f"{exc} (try a smaller learning rate or batch size)", settings)
        status, error = "failed", {"title": "Training diverged", "detail": detail}
    else:
        log.exception("job %s unit %s failed", job_id, unit_id)
        first = (str(exc).splitlines() or [""])[0][:500]
        detail = public_detail(f"{type(exc).__name__}: {first}", settings)
        status, error = "failed", {"title": "Internal error", "detail": detail}
    with session_scope() as s:
        finish_unit(s, unit_id, worker_id, status)
        if stop_job(s, job_id, status, error):
            ended.append(True)
    return status


__all__ = ["UnitLease", "execute_unit"]
