"""Runs one job from the database: claim (lease) -> resolve inputs -> core.pipeline.run_job with a
database-backed StageContext -> store artifacts + results -> final status.

Scratch space and checkpoints live in settings.work_root/<job_id>/ (checkpoints/, inputs/, out/),
so a job retried after its worker died resumes from its last checkpoint; the folder is removed
once the job reaches a final status.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from core.context import LocalContext
from core.errors import Cancelled, InvalidInput, TrainingDiverged
from core.pipeline import run_job
from core.results import VariantResult
from core.spec import JobSpec
from store.artifacts import ArtifactStore, get_artifact_store, store_artifact
from store.db import session_scope
from store.jobs import (
    LeaseLost,
    add_result,
    check_lease,
    claim_fair,
    claim_job,
    finish_job,
    record_stage_seconds,
    release_job,
    renew_lease,
    update_progress,
)
from store.objects import service_objects
from store.settings import Settings, get_settings
from worker.fanout import spreads, start_units
from worker.inputs import InputResolver, allowed_roots
from worker.joblog import JobLogRecorder
from worker.queue import dispatch
from worker.shutdown import SHUTTING_DOWN
from worker.webhooks import deliver_in_background

DATABASE_ERRORS = (OperationalError, InterfaceError)  # connection-level: retry, never fail the job

log = logging.getLogger("carcert.worker")

ARTIFACT_FILES = (("model.safetensors", "model"), ("mask.safetensors", "mask"), ("evidence.npz", "evidence"))
# files recorded as metrics[key] = artifact id: the pruned program of a model.program job, and the
# report's example images (core.report.save_examples)
LINKED_FILES = (
    ("model.pt2", "model", "program_artifact_id"),
    ("examples.npz", "report", "examples_artifact_id"),
)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobLease:
    """The lease a DbStageContext renews: the job's row (store.jobs)."""

    update = staticmethod(update_progress)
    check = staticmethod(check_lease)
    renew = staticmethod(renew_lease)


class DbStageContext:
    """StageContext backed by the jobs table: progress() records stage + progress at most every
    settings.progress_interval_s (and on every stage change) and renews the lease; should_cancel()
    reflects cancel_requested (read at most every progress_interval_s) or a lost lease; a heartbeat
    thread renews the lease every lease_seconds / 3 even when a stage reports nothing for a while.
    Checkpoints are files under <job dir>/checkpoints (core.context.LocalContext).

    Inside `with ctx:` the heartbeat thread also does the progress writes: progress() only hands
    the latest (stage, fraction) over and returns, so the pipeline never waits for a commit (an
    UPDATE + commit is ~4-8 ms on Postgres; a tiny job has ~7 of them). Outside `with`, progress()
    writes synchronously. The cancel check is a read-only SELECT (store.jobs.check_lease).

    `lease` says which row holds the lease: JobLease (the jobs row, the default) or, for a unit of a
    job spread over workers (worker.fanout), UnitLease with `lease_id` the unit's id."""

    def __init__(
        self, job_id: str, worker_id: str, job_dir: Path, settings: Settings, joblog: Any = None,
        lease: type[JobLease] | None = None, lease_id: str | None = None,
    ) -> None:
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.lease = lease or JobLease
        self.lease_id = lease_id or job_id
        self.joblog = joblog  # worker.joblog.JobLogRecorder: flushed by the heartbeat
        self.stage_seconds: dict[str, float] = {}  # seconds per stage, for /metrics
        self._stage_started = time.monotonic()
        self._files = LocalContext(job_dir)
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._last_check = 0.0
        self._stage: str | None = None
        self.cancel_requested = False
        self.lease_lost = False
        self.timed_out = False
        self._deadline = time.monotonic() + settings.job_time_limit_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closing = False  # set by stop_writes(): no more progress writes
        self._pending: tuple[str, float] | None = None
        self._thread: threading.Thread | None = None

    # -- database --
    def _write(self, stage: str | None, fraction: float | None) -> None:
        try:
            with session_scope() as s:
                cancel = self.lease.update(s, self.lease_id, self.worker_id, stage, fraction)
            self.cancel_requested = self.cancel_requested or cancel
        except LeaseLost:
            if self._closing:  # a last write racing the job's own finish_job: expected
                return
            log.warning("job %s: lease lost by %s; stopping", self.job_id, self.worker_id)
            self.lease_lost = True
        except Exception:  # a database hiccup must not kill a long job; the next write retries
            log.exception("job %s: progress update failed", self.job_id)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            due = stage != self._stage or now - self._last_write >= self.settings.progress_interval_s
            if not due or self._closing:
                return
            if stage != self._stage:
                self._stage_change(stage, now)
            self._stage, self._last_write = stage, now
            self._last_check = now
            value = min(max(float(fraction), 0.0), 1.0)
            if self._thread is not None:  # the heartbeat thread writes it (latest value wins)
                self._pending = (stage, value)
                self._wake.set()
                return
            self._write(stage, value)

    def _stage_change(self, stage: str | None, now: float) -> None:
        """Add the time since the last change to the current stage; log the new one."""
        if self._stage is not None:
            spent = now - self._stage_started
            self.stage_seconds[self._stage] = self.stage_seconds.get(self._stage, 0.0) + spent
        self._stage_started = now
        if stage is not None:
            log.info("job %s: stage %s", self.job_id, stage)

    def should_cancel(self) -> bool:
        if SHUTTING_DOWN.is_set():
            return True
        now = time.monotonic()
        if now > self._deadline:  # enforced here too: Celery's time limits need the prefork pool
            self.timed_out = True
            return True
        with self._lock:
            check = not (self.cancel_requested or self.lease_lost) and (
                now - self._last_check >= self.settings.progress_interval_s
            )
            if check:
                self._last_check = now
        if check:
            try:
                with session_scope() as s:
                    cancel = self.lease.check(s, self.lease_id, self.worker_id)
                self.cancel_requested = self.cancel_requested or cancel
            except LeaseLost:
                log.warning("job %s: lease lost by %s; stopping", self.job_id, self.worker_id)
                self.lease_lost = True
            except Exception:
                log.exception("job %s: cancel check failed", self.job_id)
        return self.cancel_requested or self.lease_lost

    def stop_writes(self) -> None:
        """No more progress writes: the job is about to be finished (finish_job sets stage "done"
        and progress 1.0 itself); a pending write is dropped. The lease heartbeat goes on until
        __exit__, so a slow upload of the results keeps the lease."""
        with self._lock:
            self._closing = True
            self._pending = None

    # -- checkpoints --
    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        self._files.save_checkpoint(key, state)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        return self._files.load_checkpoint(key)

    # -- heartbeat + progress writer --
    def _beat(self) -> None:
        interval = max(1.0, self.settings.lease_seconds / 3)
        last = time.monotonic()
        while True:
            self._wake.wait(max(0.0, last + interval - time.monotonic()))
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is not None:
                self._write(*pending)  # also renews the lease
                last = time.monotonic()
                if self.joblog is not None:
                    self.joblog.flush()
            elif time.monotonic() - last >= interval:
                try:
                    with session_scope() as s:
                        self.cancel_requested = (
                            self.lease.renew(s, self.lease_id, self.worker_id) or self.cancel_requested
                        )
                except LeaseLost:
                    self.lease_lost = True
                except Exception:
                    log.exception("job %s: lease renewal failed", self.job_id)
                last = time.monotonic()
            if self.lease_lost:
                return

    def __enter__(self) -> DbStageContext:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.job_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_writes()
        self._stage_change(None, time.monotonic())
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def variant_results(out_dir: Path, summary: dict[str, Any]) -> list[VariantResult]:
    """The typed results run_job handed over in its summary (else those of the variant folders
    under `out_dir`)."""
    variants = summary.get("variants") if isinstance(summary, dict) else None
    if variants:
        return [VariantResult.model_validate(v) for v in variants]
    return [VariantResult.read(p) for p in sorted(out_dir.iterdir()) if (p / "metrics.json").is_file()]


def restore_refs(obj: Any, mapping: dict[str, str]) -> Any:
    """Replace every string equal to a resolved local reference by the user's original one
    ("npz:/work/<job>/inputs/..." -> "artifact:<id>"), so no server path reaches the user."""
    if isinstance(obj, str):
        return mapping.get(obj, obj)
    if isinstance(obj, dict):
        return {k: restore_refs(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_refs(v, mapping) for v in obj]
    return obj


def ref_mapping(original: JobSpec, resolved: JobSpec) -> dict[str, str]:
    pairs = [
        (resolved.dataset, original.dataset),
        (resolved.model.weights, original.model.weights),
        (resolved.model.program, original.model.program),
        (resolved.mask, original.mask),
        (resolved.transform.encoder, original.transform.encoder),
        (resolved.transform.decoder, original.transform.decoder),
    ]
    out = {}
    for new, old in pairs:
        if new and old and new != old:
            out[new] = old
            if ":" in new and new.split(":", 1)[0] in ("npz", "imagefolder"):
                out[new.split(":", 1)[1]] = old
    return out


def served_certificate(folder: Path, refs: dict[str, str] | None, job_id: str) -> dict[str, Any] | None:
    """The variant's certificate as stored and served: the user's references restored, job_id set."""
    cert = restore_refs(_read_json(folder / "certificate.json"), refs or {})
    if cert is not None and not cert.get("job_id"):
        cert["job_id"] = job_id
    return cert


def persist_outputs(
    job_id: str,
    tenant: str,
    worker_id: str,
    out_dir: Path,
    summary: dict[str, Any],
    store: ArtifactStore,
    refs: dict[str, str] | None = None,
    finish: Callable[[Session, dict[str, Any]], bool] | None = None,
) -> bool:
    """Store each variant's files as artifacts and a JobResult row, then mark the job succeeded
    (or call `finish(session, summary)`, which returns False when the lease was lost: a unit of a
    spread job, worker.fanout), all in one transaction (blobs are deleted again if it fails).
    False if the lease was lost."""
    stored_keys: list[str] = []
    try:
        with session_scope() as s:
            for result in variant_results(out_dir, summary):
                name, folder = result.name, out_dir / result.name
                metrics = restore_refs(_read_json(folder / "metrics.json") or {}, refs or {})
                cert = served_certificate(folder, refs, job_id)
                ids: dict[str, str | None] = {}
                for filename, kind in ARTIFACT_FILES:
                    path = folder / filename
                    if path.is_file():
                        art = store_artifact(
                            s, tenant, kind, f"{job_id}-{name}-{filename}", path, store=store
                        )
                        stored_keys.append(art.storage_key)
                        ids[kind] = art.id
                for filename, kind, key in LINKED_FILES:
                    path = folder / filename
                    if path.is_file():
                        label = f"{job_id}-{name}-{filename}"
                        art = store_artifact(s, tenant, kind, label, path, store=store)
                        stored_keys.append(art.storage_key)
                        metrics[key] = art.id
                add_result(
                    s,
                    job_id,
                    result,
                    certificate=cert,
                    metrics=metrics,
                    model_artifact_id=ids.get("model"),
                    mask_artifact_id=ids.get("mask"),
                    evidence_artifact_id=ids.get("evidence"),
                )
            summary = restore_refs(summary, refs or {})
            done = (finish(s, summary) if finish is not None
                    else finish_job(s, job_id, "succeeded", summary=summary, worker_id=worker_id))
            if not done:
                raise LeaseLost(job_id)
        return True
    except LeaseLost:
        for key in stored_keys:
            store.delete(key)
        log.warning("job %s: lease lost before the results were saved", job_id)
        return False
    except BaseException:
        for key in stored_keys:
            store.delete(key)
        raise


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:[^\s/'\"(),;]+/)+([^\s/'\"(),;]+)")


def public_detail(detail: str, settings: Settings | None = None) -> str:
    """`detail` without absolute server paths, for the job's error shown to the tenant: the work,
    artifact and data folders become <work>, <artifacts>, <data>; any other absolute path keeps
    its file name only (".../name"). A path the user wrote after a prefix ('npz:/data/x.npz')
    stays as written."""
    settings = settings or get_settings()
    roots = [(settings.work_root, "<work>"), (settings.artifact_root, "<artifacts>")]
    roots += [(r, "<data>") for r in settings.data_roots]
    for root, name in sorted(roots, key=lambda rn: -len(str(Path(rn[0]).resolve()))):
        for form in {str(Path(root).resolve()), str(Path(root).expanduser())}:
            if form.startswith("/") and len(form) > 1:
                detail = detail.replace(form, name)
    return ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), detail)


def _fail(
    job_id: str, worker_id: str, status: str, title: str | None = None, detail: str | None = None
) -> None:
    error = {"title": title, "detail": public_detail(detail or "")} if title else None
    with session_scope() as s:
        finish_job(s, job_id, status, error=error, worker_id=worker_id)


def _release(job_id: str, worker_id: str, reason: str = "shutdown") -> str:
    """Requeue the job (checkpoints stay in the work folder) and re-send it: on worker shutdown,
    or after a database error that made this attempt's writes fail."""
    with session_scope() as s:
        released = release_job(s, job_id, worker_id)
    if released:
        dispatch(job_id)
        log.warning("job %s released for another attempt (%s)", job_id, reason)
    return "released"


def execute_job(
    job_id: str,
    *,
    worker_id: str | None = None,
    settings: Settings | None = None,
    device: str | None = None,
    fair: bool = False,
) -> str:
    """Run job `job_id` if it can be claimed; with `fair` (the Celery task), the job a broker message
    for `job_id` stands for: the one store.jobs.claim_fair picks (tenants take turns). Returns the
    final status ("succeeded", "failed", "cancelled"), "fanned-out" (a sweep whose variants now run
    as units on any worker: worker.fanout), "skipped" (not claimable: already running
    elsewhere, finished, cancelled) or
    "lost" (the lease was taken over by another worker) or "released" (worker shutting down; the
    job was put back in the queue and resumes from its checkpoints)."""
    settings = settings or get_settings()
    worker_id = worker_id or new_worker_id()
    if SHUTTING_DOWN.is_set():  # a message consumed during a warm shutdown: leave it to the next worker
        dispatch(job_id)
        return "released"
    with session_scope() as s:
        job = claim_fair(s, job_id, worker_id) if fair else claim_job(s, job_id, worker_id)
        if job is None:
            log.info("job %s not claimable and nothing queued; skipped", job_id)
            return "skipped"
        if job.id != job_id:
            log.info("message for job %s runs job %s (fair share across tenants)", job_id, job.id)
        job_id, tenant, spec_json, attempt = job.id, job.tenant, job.spec, job.attempts
    job_dir = Path(settings.work_root).resolve() / job_id
    saved = sorted(p.name for p in (job_dir / "checkpoints").glob("*.pt"))
    store = get_artifact_store()
    with JobLogRecorder(job_id, settings.job_log_max_lines) as joblog:
        log.info("job %s claimed by %s (attempt %d)", job_id, worker_id, attempt)
        if saved:
            log.warning("job %s attempt %d resumes from checkpoints %s", job_id, attempt, ", ".join(saved))
        with DbStageContext(job_id, worker_id, job_dir, settings, joblog) as ctx:
            try:
                status = _run_and_persist(job_id, tenant, spec_json, worker_id, job_dir, store, ctx, device)
            except Exception as exc:
                status = _outcome_of_failure(exc, job_id, worker_id, ctx, settings)
        if status in ("lost", "released", "fanned-out"):  # the work folder (checkpoints) stays
            return status
        shutil.rmtree(job_dir, ignore_errors=True)
        log.info("job %s finished: %s", job_id, status)
        with session_scope() as s:
            record_stage_seconds(s, job_id, ctx.stage_seconds)
    if spec_json.get("webhook"):
        deliver_in_background(job_id)
    return status


def _run_and_persist(
    job_id: str,
    tenant: str,
    spec_json: dict[str, Any],
    worker_id: str,
    job_dir: Path,
    store: ArtifactStore,
    ctx: DbStageContext,
    device: str | None,
) -> str:
    """Resolve the inputs, run the pipeline, store its outputs: "succeeded", or "lost" when the
    lease went to another worker meanwhile."""
    ctx.progress("preparing", 0.0)
    spec = JobSpec.model_validate(spec_json)
    with session_scope() as s:
        resolved = InputResolver(s, tenant, store, job_dir / "inputs", ctx.settings).resolve(spec)
    if spreads(resolved, ctx.settings):  # a sweep over workers: the shared part here, then units
        return start_units(job_id, worker_id, resolved, job_dir, ctx, device)
    summary = run_job(
        resolved,
        job_dir / "out",
        ctx,
        device=device,
        job_id=job_id,
        allowed_roots=allowed_roots(ctx.settings, job_dir),
        objects=service_objects(ctx.settings),
    )
    refs = ref_mapping(spec, resolved)
    if ctx.settings.mlflow_tracking_uri:  # before stop_writes: the heartbeat keeps the lease
        tracked = _track(job_id, tenant, spec, job_dir / "out", summary, refs, ctx)
        summary = {**(summary or {}), "mlflow": tracked}
    ctx.stop_writes()  # persist_outputs -> finish_job sets stage "done" / progress 1.0
    if ctx.lease_lost:
        return "lost"
    if not persist_outputs(job_id, tenant, worker_id, job_dir / "out", summary or {}, store, refs):
        return "lost"
    return "succeeded"


def _track(
    job_id: str, tenant: str, spec: JobSpec, out: Path, summary: dict, refs: dict, ctx: DbStageContext
) -> dict[str, Any]:
    """worker.tracking.track_job with the service's settings (the summary's "mlflow" entry)."""
    from worker.tracking import track_job

    ctx.progress("tracking", 1.0, "logging MLflow runs")
    return track_job(
        job_id,
        tenant,
        spec,
        out,
        summary or {},
        lambda name: served_certificate(out / name, refs, job_id),
        ctx.settings.mlflow_tracking_uri,
        ctx.settings.mlflow_experiment,
    )


def _time_limit_detail(settings: Settings) -> str:
    return f"the job ran longer than {settings.job_time_limit_s} s"


def _outcome_of_failure(
    exc: Exception, job_id: str, worker_id: str, ctx: DbStageContext, settings: Settings
) -> str:
    """Record what a job that raised `exc` ends as, and return that status: cancelled (or timed
    out, or handed back on shutdown), lost lease, a failure the user can act on, a database outage
    (handed back: not the job's fault), or an internal error."""
    if isinstance(exc, Cancelled):
        if ctx.lease_lost:
            return "lost"
        if ctx.timed_out:
            _fail(job_id, worker_id, "failed", "Time limit exceeded", _time_limit_detail(settings))
            return "failed"
        if SHUTTING_DOWN.is_set() and not ctx.cancel_requested:
            return _release(job_id, worker_id)
        _fail(job_id, worker_id, "cancelled")
        return "cancelled"
    if isinstance(exc, LeaseLost):
        return "lost"
    if isinstance(exc, DATABASE_ERRORS):
        # The database went away (e.g. while saving the results): not the job's fault. Keep the
        # work folder and hand the job back; it resumes from its checkpoints. If the database is
        # still away, the lease expires and the stale-job sweep sends it round again.
        log.warning("job %s: database error, retrying later: %s", job_id, exc)
        try:
            return _release(job_id, worker_id, reason="database error")
        except DATABASE_ERRORS:
            return "lost"
    if isinstance(exc, InvalidInput):
        title, detail = "Invalid input", str(exc)
    elif isinstance(exc, TrainingDiverged):
        title, detail = "Training diverged", f"{exc} (try a smaller learning rate or batch size)"
    elif isinstance(exc, SoftTimeLimitExceeded):
        title, detail = "Time limit exceeded", _time_limit_detail(settings)
    else:
        log.exception("job %s failed", job_id)
        first = (str(exc).splitlines() or [""])[0][:500]  # e.g. no SQL statement of a DB error
        title, detail = "Internal error", f"{type(exc).__name__}: {first}"
    _fail(job_id, worker_id, "failed", title, detail)
    return "failed"
