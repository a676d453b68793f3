"""SIGKILL of a real Celery worker in the middle of the mask search and in the middle of the
certification: the job is taken over by another worker (lease expiry -> stale-job sweep), resumes
from its last checkpoint (the search: its per-epoch checkpoint; the certification: the trained
variant's "result" checkpoint, so no training stage runs again) and ends with the same certificate,
evidence, model and mask as an uninterrupted run of the same spec and seed.

Real Postgres + Redis + worker subprocesses (fixtures of conftest.py); the stage to kill in is
found by polling the job row and the checkpoint folder."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import update

from core.spec import JobSpec
from store import jobs as repo
from store.artifacts import get_artifact_store
from store.db import session_scope
from store.models import Artifact, Job, utcnow
from tests.integration.service_helpers import TINY_JOB, WorkerProc, launch_worker, wait_for
from worker.queue import dispatch

pytestmark = pytest.mark.integration

FINAL = ("succeeded", "failed", "cancelled")
STAGES = ("search", "certify")
# stages long enough to land a kill in, also on an idle machine (seconds each), still a tiny job
SPEC = {
    **TINY_JOB,
    "pruning": {**TINY_JOB["pruning"], "search_epochs": 12},
    "certification": {**TINY_JOB["certification"], "samples": 80, "n": 20},
    "seed": 3,
}


def job_row(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


def wait_final(job_id: str, timeout: float, worker) -> Job:
    try:
        return wait_for(
            lambda: (j := job_row(job_id)).status in FINAL and j, timeout, interval=0.3, what="the job"
        )
    except AssertionError:
        raise AssertionError(f"job {job_id} did not finish:\n{worker.log()[-4000:]}") from None


def outcome(job_id: str) -> dict:
    """Certificate (minus job_id/created_at), evidence arrays, model and mask hashes of the job."""
    with session_scope() as s:
        (res,) = repo.get_results(s, job_id)
        arts = {
            a.kind: (a.sha256, a.storage_key)
            for a in s.query(Artifact).filter(
                Artifact.id.in_([res.model_artifact_id, res.mask_artifact_id, res.evidence_artifact_id])
            )
        }
        cert = dict(res.certificate)
    assert cert.pop("job_id") == job_id
    cert.pop("created_at")
    with np.load(get_artifact_store().local_path(arts["evidence"][1]), allow_pickle=False) as z:
        evidence = {k: z[k] for k in z.files}
    return {
        "certificate": cert,
        "evidence": evidence,
        "model": arts["model"][0],
        "mask": arts["mask"][0],
        "accuracy": res.accuracy,
        "pca": res.pca,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["certificate"] == b["certificate"]
    assert set(a["evidence"]) == set(b["evidence"])
    for k in a["evidence"]:
        np.testing.assert_array_equal(a["evidence"][k], b["evidence"][k], err_msg=k)
    keys = ("model", "mask", "accuracy", "pca")
    assert [a[k] for k in keys] == [b[k] for k in keys]


@pytest.fixture(scope="module")
def setup(settings_env, celery_worker_proc, tmp_path_factory):
    """(outcome of the uninterrupted run of SPEC through the same service (main worker, attempt 1),
    {stage: victim worker on its own queue}); the victims start while the reference runs."""
    with session_scope() as s:
        job, _ = repo.create_job(s, "reliability-reference", JobSpec.model_validate(SPEC))
    assert dispatch(job.id)
    logs = tmp_path_factory.mktemp("victims")
    victims: dict[str, WorkerProc] = {}

    def start(stage: str) -> None:
        env = {**settings_env, "CARCERT_QUEUE": f"victim-{stage}", "CARCERT_SWEEP_INTERVAL_S": "0"}
        victims[stage] = launch_worker(env, logs / f"{stage}.log", f"carcert-test-victim-{stage}")

    starters = [threading.Thread(target=start, args=(stage,)) for stage in STAGES]
    for t in starters:
        t.start()
    try:
        done = wait_final(job.id, 300, celery_worker_proc)
        assert done.status == "succeeded" and done.attempts == 1, done.error
        reference = outcome(job.id)
        for t in starters:
            t.join(120)
        assert set(victims) == set(STAGES)
        yield reference, victims
    finally:
        for t in starters:
            t.join(120)
        for w in victims.values():
            w.stop()
        with session_scope() as s:
            repo.request_cancel(s, "reliability-reference", job.id)


def checkpoints(service_dirs, job_id: str) -> list[str]:
    return sorted(p.name for p in (service_dirs["work"] / job_id / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_mid_stage_resumes_to_the_same_certificate(
    stage, setup, celery_worker_proc, tenant, service_dirs
):
    reference, victims = setup
    victim = victims[stage]
    with session_scope() as s:
        job, _ = repo.create_job(s, tenant, JobSpec.model_validate(SPEC))
        job_id = job.id
    with session_scope() as s:  # keep the main worker's sweep off the queued job: only the victim gets it
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() + timedelta(minutes=5)))
    assert dispatch(job_id, queue=f"victim-{stage}")

    def in_stage() -> bool:
        j = job_row(job_id)
        assert j.status not in FINAL, f"the job ended before the kill: {j.status} {j.error}"
        names = checkpoints(service_dirs, job_id)
        if stage == "search":  # >= 1 search epoch checkpointed and >= 2 still to run (no race
            # with the last epoch's save between this poll and the kill)
            saved = [n for n in names if "search" in n]
            if j.stage != "search" or not saved:
                return False
            ck_path = service_dirs["work"] / job_id / "checkpoints" / saved[0]
            epoch = int(torch.load(ck_path, map_location="cpu", weights_only=True)["epoch"])
            return epoch + 1 <= SPEC["pruning"]["search_epochs"] - 2
        return j.stage == "certify" and any("result" in n for n in names)

    wait_for(in_stage, 240, interval=0.05, what=f"the victim to be in stage {stage}")
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    killed = job_row(job_id)
    assert killed.status == "running" and killed.stage == stage and killed.attempts == 1
    assert killed.lease_owner.split(":")[1] == str(victim.proc.pid)
    saved = checkpoints(service_dirs, job_id)
    if stage == "search":
        names = [n for n in saved if "search" in n]
        state = torch.load(
            service_dirs["work"] / job_id / "checkpoints" / names[0], map_location="cpu", weights_only=True
        )
        epochs_done = int(state["epoch"]) + 1
        assert 1 <= epochs_done < SPEC["pruning"]["search_epochs"], epochs_done

    # watch the checkpoint files during the second attempt: a checkpoint of a stage that had
    # finished before the kill must never be written again (it was loaded, not recomputed), and
    # the resumed search must never save an epoch it had already saved
    ck_dir = service_dirs["work"] / job_id / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ck_dir.glob("*.pt")}
    rewritten: set[str] = set()
    search_epochs_saved: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        last = dict(before)
        while not stop.is_set():
            for p in list(ck_dir.glob("*.pt")):
                try:
                    mtime = p.stat().st_mtime_ns
                    if last.get(p.name) == mtime:
                        continue
                    last[p.name] = mtime
                    if p.name in before:
                        rewritten.add(p.name)
                    if "search" in p.name:
                        ck = torch.load(p, map_location="cpu", weights_only=True)
                        search_epochs_saved.append(int(ck["epoch"]))
                except (FileNotFoundError, RuntimeError, EOFError):
                    pass  # removed when the job finished
            time.sleep(0.03)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = wait_final(job_id, 300, celery_worker_proc)
    finally:
        stop.set()
        watcher.join(5)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2 and done.lease_owner is None
    assert f"job {job_id} claimed by" in celery_worker_proc.log()
    finished_before = [n for n in before if "pretrain" in n or (stage == "certify" and "certify" not in n)]
    assert finished_before, before
    assert not rewritten & set(finished_before), (rewritten, before)
    if stage == "search":  # continued after the last saved epoch, not from epoch 0
        assert search_epochs_saved and min(search_epochs_saved) == epochs_done, search_epochs_saved
    assert not Path(service_dirs["work"] / job_id).exists()
    assert_same(outcome(job_id), reference)
