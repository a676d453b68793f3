"""A real Celery worker with CARCERT_MLFLOW_TRACKING_URI pointing at a real `mlflow server` on
loopback (SQLite backend, artifacts proxied by the server): a succeeded job has one MLflow run per
variant whose tags, metrics and artifacts match the job's stored results, and its summary names
the runs. A worker whose tracking server is down still succeeds the job and records the error."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from store import jobs as repo
from store.db import session_scope
from store.models import Job, utcnow
from tests.integration.service_helpers import TINY_JOB, wait_for
from worker.queue import dispatch

pytestmark = pytest.mark.integration
SPEC = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "method": "lmp"}, "sweep_prune_ratios": [0.5, 0.7]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
        "--artifacts-destination", str(base / "artifacts"),
    ]  # fmt: skip
    with open(base / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=base, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (base / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 300, interval=0.5, what="mlflow server")  # its imports take long on busy cores
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _run_on(queue: str, tenant: str, spec: dict) -> Job:
    """Submit a job only the worker on `queue` takes (the main worker's sweep is kept off it)."""
    from core.spec import JobSpec

    with session_scope() as s:
        job, _ = repo.create_job(s, tenant, JobSpec.model_validate(spec), None)
        s.flush()
        s.execute(update(Job).where(Job.id == job.id).values(updated_at=utcnow() + timedelta(minutes=10)))
        job_id = job.id
    assert dispatch(job_id, queue=queue)

    def final() -> Job | None:
        with session_scope() as s:
            row = s.get(Job, job_id)
            return row if row.status in ("succeeded", "failed", "cancelled") else None

    return wait_for(final, 300, interval=0.5, what=f"job {job_id}")


def test_worker_logs_one_run_per_variant(mlflow_url, start_worker, tenant) -> None:
    from mlflow import MlflowClient

    env = {"CARCERT_MLFLOW_TRACKING_URI": mlflow_url, "CARCERT_MLFLOW_EXPERIMENT": "itest"}
    worker = start_worker("mlflow", CARCERT_QUEUE="mlflow-queue", CARCERT_SWEEP_INTERVAL_S="0", **env)
    job = _run_on("mlflow-queue", tenant, SPEC)
    assert job.status == "succeeded", (job.error, worker.log()[-3000:])
    tracked = job.summary["mlflow"]
    assert "error" not in tracked, tracked
    assert set(tracked["runs"]) == {"lmp-0.50", "lmp-0.70"}
    client = MlflowClient(tracking_uri=mlflow_url)
    with session_scope() as s:
        results = {r.name: r for r in repo.get_results(s, job.id)}
    for name, run_id in tracked["runs"].items():
        run, res = client.get_run(run_id), results[name]
        assert run.info.experiment_id == tracked["experiment_id"] and run.info.status == "FINISHED"
        assert run.data.tags["carcert.job_id"] == job.id and run.data.tags["carcert.tenant"] == tenant
        assert run.data.tags["carcert.method"] == res.method
        assert run.data.params["pruning.method"] == res.method
        assert run.data.metrics["pca"] == pytest.approx(res.pca)
        assert run.data.metrics["accuracy"] == pytest.approx(res.accuracy)
        assert run.data.metrics["sparsity"] == pytest.approx(res.sparsity)
        assert run.data.metrics["accuracy_cert_subset"] == pytest.approx(res.certificate["accuracy"])
        assert {a.path for a in client.list_artifacts(run_id)} == {
            "certificate.json",
            "model.safetensors",
            "mask.safetensors",
        }
        mask = Path(client.download_artifacts(run_id, "mask.safetensors", str(worker.log_path.parent)))
        assert hashlib.sha256(mask.read_bytes()).hexdigest() == res.certificate["mask_sha256"]


def test_tracking_server_down_does_not_fail_the_job(start_worker, tenant) -> None:
    worker = start_worker("mlflow-down", CARCERT_QUEUE="mlflow-down", CARCERT_SWEEP_INTERVAL_S="0",
                          CARCERT_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}",
                          MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")  # fmt: skip
    started = time.monotonic()
    job = _run_on("mlflow-down", tenant, TINY_JOB)
    assert job.status == "succeeded", (job.error, worker.log()[-3000:])
    assert job.summary["mlflow"]["runs"] == {} and job.summary["mlflow"]["error"]
    assert "MLflow logging failed" in worker.log()
    assert time.monotonic() - started < 240
