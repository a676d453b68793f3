"""worker.tracking against a real MLflow file store: one run per variant of a real (tiny) sweep,
read back with MlflowClient; params, metrics, tags and artifacts equal the job's own files; a
retried job logs nothing twice; an unreachable server is recorded, not raised."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from core.context import LocalContext
from core.pipeline import run_job
from core.spec import JobSpec
from tests.integration.service_helpers import TINY_JOB
from worker.tracking import flatten, track_job

SPEC = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "method": "lmp"}, "sweep_prune_ratios": [0.5, 0.7]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[JobSpec, Path, dict]:
    out = tmp_path_factory.mktemp("job") / "out"
    spec = JobSpec.model_validate(SPEC)
    summary = run_job(spec, out, LocalContext(out), device="cpu", job_id="job1")
    return spec, out, summary


def _cert(out: Path, name: str) -> dict:
    return {**json.loads((out / name / "certificate.json").read_text()), "job_id": "job1"}


def test_one_run_per_variant_with_the_job_contents(tmp_path: Path, finished, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec, out, summary = finished
    uri = f"file:{tmp_path / 'mlruns'}"
    got = track_job("job1", "alice", spec, out, summary, lambda n: _cert(out, n), uri, "carcert-test")
    assert set(got["runs"]) == {"lmp-0.50", "lmp-0.70"} and "error" not in got
    client = MlflowClient(tracking_uri=uri)
    for name, run_id in got["runs"].items():
        run = client.get_run(run_id)
        metrics = json.loads((out / name / "metrics.json").read_text())
        cert = _cert(out, name)
        assert run.info.status == "FINISHED" and run.info.run_name == f"job1-{name}"
        assert run.data.params["pruning.method"] == "lmp"
        assert float(run.data.params["pruning.prune_ratio"]) == metrics["prune_ratio"]
        assert run.data.params["certification.n"] == str(SPEC["certification"]["n"])
        assert run.data.params["dataset"] == "digits"
        assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
        assert run.data.metrics["pca"] == pytest.approx(cert["pca"])
        assert run.data.metrics["sparsity"] == pytest.approx(metrics["sparsity"])
        assert run.data.metrics["accuracy_cert_subset"] == pytest.approx(cert["accuracy"])
        body = {k: v for k, v in cert.items() if k not in ("created_at", "job_id")}
        tags = run.data.tags
        assert (
            tags["carcert.certificate_sha256"]
            == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        )
        assert tags["carcert.job_id"] == "job1" and tags["carcert.method"] == "lmp"
        assert float(tags["carcert.prune_ratio"]) == metrics["prune_ratio"]
        assert {a.path for a in client.list_artifacts(run_id)} == {
            "certificate.json",
            "model.safetensors",
            "mask.safetensors",
        }
        model = Path(client.download_artifacts(run_id, "model.safetensors", str(tmp_path / name)))
        assert hashlib.sha256(model.read_bytes()).hexdigest() == cert["model"]["sha256"]
    # a retried job: the same runs, none added
    again = track_job("job1", "alice", spec, out, summary, lambda n: _cert(out, n), uri, "carcert-test")
    assert again["runs"] == got["runs"]
    assert len(client.search_runs([got["experiment_id"]])) == 2


def test_unreachable_server_is_recorded_not_raised(finished, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    spec, out, summary = finished
    got = track_job("job1", "alice", spec, out, summary, lambda n: None, "http://127.0.0.1:9", "x")
    assert got["runs"] == {} and "error" in got and got["error"]


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x", "f": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "null",
        "e": "x",
        "f": "{}",
    }
