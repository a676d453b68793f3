"""Real jobs through the real Celery worker (Redis broker, Postgres database): results and
artifacts stored and checked against an independent recomputation; cancel; a lost broker message
and a killed worker do not lose the job."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import update

from core.spec import JobSpec
from store import jobs as repo
from store.artifacts import get_artifact_store
from store.db import session_scope
from store.models import Artifact, Job, utcnow
from tests.integration.service_helpers import TINY_JOB, wait_for
from worker.queue import dispatch

pytestmark = pytest.mark.integration

FINAL = ("succeeded", "failed", "cancelled")


def submit(tenant: str, spec: dict, send: bool = True) -> str:
    with session_scope() as s:
        job, _ = repo.create_job(s, tenant, JobSpec.model_validate(spec))
    if send:
        assert dispatch(job.id)
    return job.id


def job_row(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


def wait_final(job_id: str, timeout: float, worker=None) -> Job:
    def done():
        job = job_row(job_id)
        return job if job.status in FINAL else None

    try:
        return wait_for(done, timeout, interval=0.5, what=f"job {job_id} to finish")
    except AssertionError:
        raise AssertionError(
            f"job {job_id} did not finish:\n{worker.log()[-4000:] if worker else ''}"
        ) from None


def test_tiny_job_succeeds_with_results_and_artifacts(celery_worker_proc, tenant, service_dirs, tmp_path):
    job_id = submit(tenant, TINY_JOB)
    job = wait_final(job_id, 240, celery_worker_proc)
    assert job.status == "succeeded", job.error
    assert (job.stage, job.progress, job.attempts, job.lease_owner) == ("done", 1.0, 1, None)
    assert job.started_at <= job.finished_at
    assert not (service_dirs["work"] / job_id).exists()  # scratch space removed

    with session_scope() as s:
        results = repo.get_results(s, job_id)
        assert [r.name for r in results] == ["car-0.50"]
        res = results[0]
        arts = {
            a.kind: a
            for a in s.query(Artifact)
            .filter(Artifact.id.in_([res.model_artifact_id, res.mask_artifact_id, res.evidence_artifact_id]))
            .all()
        }
    assert res.method == "car" and res.prune_ratio == 0.5
    assert set(arts) == {"model", "mask", "evidence"} and all(a.tenant == tenant for a in arts.values())
    store = get_artifact_store()
    for art in arts.values():  # blob bytes match the recorded hash and size
        data = store.local_path(art.storage_key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.size

    # sparsity recomputed from the stored weights (conv / linear weights = the prunable ones)
    weights = load_file(store.local_path(arts["model"].storage_key))
    prunable = {k: v for k, v in weights.items() if k.endswith("weight") and v.dim() in (2, 4)}
    zeros = sum(int((v == 0).sum()) for v in prunable.values())
    total = sum(v.numel() for v in prunable.values())
    assert res.sparsity == pytest.approx(zeros / total, abs=1e-9)
    masks = load_file(store.local_path(arts["mask"].storage_key))
    expected_pruned = sum(m.numel() - round(0.5 * m.numel()) for m in masks.values())
    assert sum(int((~m.bool()).sum()) for m in masks.values()) == pytest.approx(
        expected_pruned, abs=len(masks)
    )
    assert set(masks) == set(prunable)

    # accuracy recomputed from the stored model on the same test split
    from core.data import load_dataset
    from core.models import build_model, load_weights
    from core.training import evaluate

    data = load_dataset("digits", seed=0, train_subset=300)
    model = build_model("small_cnn", data.num_classes, data.in_channels)
    load_weights(model, store.local_path(arts["model"].storage_key))
    assert evaluate(model, data.test_x, data.test_y) == pytest.approx(res.accuracy, abs=1e-9)

    # the certificate in the database verifies bit for bit against the stored evidence
    from core.certify import verify_certificate

    cert = res.certificate
    assert cert["job_id"] == job_id and len(cert["samples"]) == 5
    assert cert["params"]["n"] == 10 and cert["params"]["l"] == 2
    assert res.pca == pytest.approx(sum(x["certified"] for x in cert["samples"]) / 5)
    cert_path = tmp_path / "certificate.json"
    cert_path.write_text(json.dumps(cert))
    assert verify_certificate(cert_path, store.local_path(arts["evidence"].storage_key)) == []
    assert job.summary["variants"][0]["name"] == "car-0.50"


def test_invalid_input_fails_with_a_clear_error(celery_worker_proc, tenant):
    job_id = submit(tenant, {**TINY_JOB, "dataset": "artifact:0123456789abcdef0123456789abcdef"})
    job = wait_final(job_id, 120, celery_worker_proc)
    assert job.status == "failed"
    assert job.error["title"] == "Invalid input" and "not found" in job.error["detail"]


def test_cancel_a_running_job(celery_worker_proc, tenant, service_dirs):
    long_job = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "pretrain_epochs": 200}}
    job_id = submit(tenant, long_job)
    wait_for(lambda: job_row(job_id).stage == "pretrain", 120, what="the job to start pretraining")
    with session_scope() as s:
        assert repo.request_cancel(s, tenant, job_id).cancel_requested
    job = wait_final(job_id, 60, celery_worker_proc)
    assert job.status == "cancelled" and job.error is None
    with session_scope() as s:
        assert repo.get_results(s, job_id) == []
    assert not (service_dirs["work"] / job_id).exists()


def test_lost_broker_message_is_recovered_by_the_sweep(celery_worker_proc, tenant):
    """The job is committed but its message never sent: the worker's periodic sweep finds it
    (queued longer than CARCERT_QUEUED_STALE_SECONDS) and runs it."""
    job_id = submit(tenant, TINY_JOB, send=False)
    job = wait_final(job_id, 240, celery_worker_proc)
    assert job.status == "succeeded" and job.attempts == 1


def test_killed_worker_job_is_resumed_by_another(celery_worker_proc, start_worker, tenant):
    """A second worker (own queue) takes the job and is killed with SIGKILL mid-run; its lease
    expires, the main worker's sweep dispatches the job again and it finishes (attempt 2)."""
    victim = start_worker("victim", CARCERT_QUEUE="victim-queue", CARCERT_SWEEP_INTERVAL_S="0")
    # a search of seconds: progress reaches the database every progress_interval_s, so a stage
    # shorter than that (1 epoch on 300 digits) may never be seen there
    spec = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "pretrain_epochs": 3, "search_epochs": 60}}
    job_id = submit(tenant, spec, send=False)
    with session_scope() as s:  # keep the main worker's sweep off the queued job: only the victim gets it
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() + timedelta(minutes=5)))
    assert dispatch(job_id, queue="victim-queue")
    wait_for(
        lambda: job_row(job_id).stage in ("search", "finetune"), 180, what="the victim to reach the search"
    )
    assert job_row(job_id).lease_owner.split(":")[1] == str(victim.proc.pid)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    job = wait_final(job_id, 240, celery_worker_proc)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert f"job {job_id} claimed by" in celery_worker_proc.log()
    assert Path(celery_worker_proc.log_path).exists()


def test_a_leased_job_is_not_run_twice(celery_worker_proc, tenant):
    """A duplicate message for a job leased by a live worker is skipped, not run again."""
    job_id = submit(tenant, TINY_JOB, send=False)
    with session_scope() as s:
        assert repo.claim_job(s, job_id, "live-worker") is not None
    assert dispatch(job_id)
    wait_for(lambda: f"job {job_id} not claimable" in celery_worker_proc.log(), 60, what="the skip")
    job = job_row(job_id)
    assert job.status == "running" and job.lease_owner == "live-worker" and job.attempts == 1
    with session_scope() as s:
        repo.finish_job(s, job_id, "cancelled", worker_id="live-worker")
