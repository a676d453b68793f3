"""worker.runner.DbStageContext and execute_job on a real SQLite database (in process): throttled
progress writes, cancel, lease heartbeat, lost lease, time limit, hand-back on worker shutdown."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import event, update

from core.spec import JobSpec
from store import jobs as repo
from store.db import get_engine, session_scope
from store.models import Job, utcnow
from store.settings import get_settings
from tests.integration.service_helpers import claimed_job, job_row, sqlite_service
from worker.runner import DbStageContext, execute_job
from worker.shutdown import SHUTTING_DOWN

pytestmark = pytest.mark.integration


@pytest.fixture
def sqlite_env(tmp_path) -> Iterator[dict[str, str]]:
    with sqlite_service(tmp_path, CARCERT_LEASE_SECONDS="3") as env:
        yield env


def test_progress_writes_are_throttled(sqlite_env, tmp_path):
    job_id = claimed_job()
    writes: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            writes.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    ctx = DbStageContext(job_id, "w1", tmp_path / "job", get_settings())
    t0 = time.monotonic()
    for i in range(1000):
        ctx.progress("pretrain", i / 2000)
    elapsed = time.monotonic() - t0
    if elapsed >= 0.5:
        pytest.skip(f"machine too slow to test the 0.5 s throttle ({elapsed:.2f} s)")
    assert len(writes) == 1  # only the first call of the burst
    ctx.progress("search", 0.6)  # a new stage is written at once
    assert len(writes) == 2
    assert (job_row(job_id).stage, job_row(job_id).progress) == ("search", 0.6)
    time.sleep(0.55)
    ctx.progress("search", 0.7)
    assert len(writes) == 3 and job_row(job_id).progress == 0.7
    event.remove(get_engine(), "before_cursor_execute", count)


def test_should_cancel_follows_the_database(sqlite_env, tmp_path):
    job_id = claimed_job()
    ctx = DbStageContext(job_id, "w1", tmp_path / "job", get_settings())
    assert ctx.should_cancel() is False
    with session_scope() as s:
        repo.request_cancel(s, "t", job_id)
    time.sleep(0.55)
    assert ctx.should_cancel() is True


def test_heartbeat_renews_the_lease_and_notices_a_lost_one(sqlite_env, tmp_path):
    job_id = claimed_job()
    first = job_row(job_id).lease_expires_at
    with DbStageContext(job_id, "w1", tmp_path / "job", get_settings()) as ctx:
        time.sleep(2.3)  # heartbeat every max(1, lease/3) = 1 s
        renewed = job_row(job_id).lease_expires_at
        assert renewed > first
        with session_scope() as s:  # another worker takes the job over after an expiry
            s.execute(
                update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        with session_scope() as s:
            assert repo.claim_job(s, job_id, "w2") is not None
        time.sleep(0.55)
        assert ctx.should_cancel() is True and ctx.lease_lost
    assert job_row(job_id).lease_owner == "w2"


def test_time_limit_stops_the_job(sqlite_env, tmp_path):
    job_id = claimed_job()
    ctx = DbStageContext(
        job_id, "w1", tmp_path / "job", get_settings().model_copy(update={"job_time_limit_s": 0})
    )
    time.sleep(0.01)
    assert ctx.should_cancel() is True and ctx.timed_out


def test_shutdown_hands_the_job_back_to_the_queue(sqlite_env, tmp_path):
    with session_scope() as s:
        job, _ = repo.create_job(s, "t", JobSpec(train_subset=50))
    with session_scope() as s:
        assert repo.claim_job(s, job.id, "w1") is not None
    with session_scope() as s:  # what execute_job does once the running pipeline saw the shutdown
        s.execute(update(Job).where(Job.id == job.id).values(status="queued", lease_owner=None))
    SHUTTING_DOWN.set()
    try:
        assert execute_job(job.id, worker_id="w1") == "released"  # not even claimed while stopping
        with session_scope() as s:
            assert repo.claim_job(s, job.id, "w1") is not None
        from worker.runner import _release

        assert _release(job.id, "w1") == "released"
    finally:
        SHUTTING_DOWN.clear()
    j = job_row(job.id)
    assert (j.status, j.attempts, j.lease_owner) == ("queued", 1, None)
    # and it was sent again each time: two messages wait in the broker database
    with sqlite3.connect(tmp_path / "broker.sqlite") as con:
        assert con.execute("SELECT count(*) FROM kombu_message WHERE visible = 1").fetchone()[0] == 2
    # a finished or cancelled job is never run
    with session_scope() as s:
        repo.request_cancel(s, "t", job.id)
    assert execute_job(job.id, worker_id="w2") == "skipped"


def test_local_paths_are_mapped_back_to_the_users_references():
    from worker.runner import ref_mapping, restore_refs

    original = JobSpec(dataset="artifact:abc", model={"weights": "artifact:w1"})
    resolved = original.model_copy(
        update={
            "dataset": "npz:/srv/work/j/inputs/dataset-abc.npz",
            "model": original.model.model_copy(update={"weights": "/srv/work/j/inputs/weights-w1.pt"}),
        }
    )
    mapping = ref_mapping(original, resolved)
    cert = {
        "dataset": {"ref": "npz:/srv/work/j/inputs/dataset-abc.npz", "sha256": "x"},
        "model": {"arch": "small_cnn"},
        "samples": [{"label": 1}],
        "notes": ["/srv/work/j/inputs/weights-w1.pt"],
    }
    out = restore_refs(cert, mapping)
    assert out["dataset"] == {"ref": "artifact:abc", "sha256": "x"}
    assert out["notes"] == ["artifact:w1"] and out["samples"] == [{"label": 1}]
    assert "/srv/work" not in str(out)
    assert ref_mapping(JobSpec(), JobSpec()) == {}  # built-in datasets are left alone


def test_one_gpu_per_worker_process_round_robin(monkeypatch):
    from worker.celery_app import pin_gpu, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    settings = get_settings().model_copy(update={"gpus": None})
    assert visible_gpus(settings) == ["2", "5", "7"]
    chosen = []
    for index in range(5):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")  # what the parent process sees
        chosen.append(pin_gpu(index, settings))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == chosen[-1]
    assert chosen == ["2", "5", "7", "2", "5"]
    assert pin_gpu(3, settings.model_copy(update={"gpus": ["a", "b"]})) == "b"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(settings) == [] and pin_gpu(0, settings) is None


def test_shutdown_during_a_run_releases_the_job_with_its_checkpoints(sqlite_env, tmp_path):
    import threading

    with session_scope() as s:
        job, _ = repo.create_job(
            s, "t", JobSpec(train_subset=200, pruning={"pretrain_epochs": 50}, certification={"samples": 5})
        )
    out: list[str] = []
    runner = threading.Thread(target=lambda: out.append(execute_job(job.id, worker_id="w1")))
    runner.start()
    try:
        checkpoints = tmp_path / "work" / job.id / "checkpoints"
        wait = time.monotonic() + 120
        while not list(checkpoints.glob("*.pt")) and time.monotonic() < wait:  # an epoch was saved
            time.sleep(0.1)
        saved = sorted(p.name for p in checkpoints.glob("*.pt"))
        assert saved and job_row(job.id).stage == "pretrain"
        SHUTTING_DOWN.set()
        runner.join(60)
    finally:
        SHUTTING_DOWN.set()
        runner.join(60)
        SHUTTING_DOWN.clear()
    assert out == ["released"]
    j = job_row(job.id)
    assert (j.status, j.attempts, j.lease_owner) == ("queued", 0, None)
    # kept, so the next worker resumes instead of starting over
    assert set(saved) <= {p.name for p in checkpoints.glob("*.pt")}


def test_a_database_error_at_the_final_save_hands_the_job_back(sqlite_env, tmp_path, monkeypatch):
    """A connection error while saving the results is not the job's fault: the attempt releases
    the job (queued, outputs kept) instead of failing it, and the next attempt only saves."""
    from sqlalchemy.exc import OperationalError

    import worker.runner as runner

    with session_scope() as s:
        job, _ = repo.create_job(
            s, "t", JobSpec(train_subset=100, pruning={"method": "lmp"}, certification={"samples": 3, "n": 5})
        )
    real_persist, calls = runner.persist_outputs, []

    def persist_once_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT INTO job_results", {}, Exception("server closed the connection"))
        return real_persist(*args, **kwargs)

    monkeypatch.setattr(runner, "persist_outputs", persist_once_failing)
    assert execute_job(job.id, worker_id="w1") == "released"
    j = job_row(job.id)
    assert (j.status, j.lease_owner, j.error) == ("queued", None, None)
    certificate = tmp_path / "work" / job.id / "out" / "lmp-0.50" / "certificate.json"
    assert certificate.exists()  # outputs kept for the next attempt
    first = json.loads(certificate.read_text())

    assert execute_job(job.id, worker_id="w2") == "succeeded"
    assert len(calls) == 2
    with session_scope() as s:
        results = repo.get_results(s, job.id)
        assert [r.name for r in results] == ["lmp-0.50"]
        assert results[0].certificate["created_at"] == first["created_at"]  # saved, not recomputed
    assert job_row(job.id).status == "succeeded"
