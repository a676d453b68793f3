"""The cluster layout: artifacts in S3-compatible object storage, API and worker on separate
"machines" (their own local cache folders, nothing shared but Postgres, Redis and the bucket).

A real S3 server (moto's standalone server, a subprocess on loopback, spoken to over HTTP by boto3)
holds the blobs. Weights uploaded through the API land in the bucket, the worker downloads them
from there, runs the real pipeline and uploads its outputs, and the API serves them from the
bucket: every byte compared by sha256 with what was sent or stored."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration.api_harness import ROOT, create_key, fresh_database, poll_job, run_server
from tests.integration.s3_server import BUCKET, CREDENTIALS, moto_s3
from tests.integration.service_helpers import TINY_JOB, launch_worker

pytestmark = pytest.mark.integration

PREFIX = "cluster/"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


def _machine_env(base: dict[str, str], root: Path) -> dict[str, str]:
    """One machine's settings: the shared database, broker, queue and bucket, its own disk."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    env.update({**base, **CREDENTIALS}, PYTHONPATH=str(ROOT))
    env.update(
        CARCERT_ARTIFACT_ROOT=str(root / "artifact-cache"),
        CARCERT_WORK_ROOT=str(root / "work"),
        CARCERT_DATA_ROOTS=f'["{root / "data"}"]',
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    return env


def _object_sha(client, key: str) -> str:
    return hashlib.sha256(client.get_object(Bucket=BUCKET, Key=PREFIX + key)["Body"].read()).hexdigest()


def _cached_blobs(root: Path) -> set[str]:
    cache = root / "artifact-cache" / "cache"
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def test_weights_job_and_outputs_travel_through_the_bucket(s3_endpoint, redis_url, tmp_path):
    from core.models import build_model, save_weights

    url, s3 = s3_endpoint
    api_root, worker_root = tmp_path / "api-machine", tmp_path / "worker-machine"
    with fresh_database() as db_url:
        shared = {
            "CARCERT_DATABASE_URL": db_url,
            "CARCERT_BROKER_URL": redis_url,
            "CARCERT_QUEUE": f"carcert-s3-{uuid.uuid4().hex[:8]}",  # no other test worker takes it
            "CARCERT_ARTIFACT_BACKEND": "s3",
            "CARCERT_S3_BUCKET": BUCKET,
            "CARCERT_S3_ENDPOINT_URL": url,
            "CARCERT_S3_PREFIX": PREFIX,
        }
        api_env, worker_env = _machine_env(shared, api_root), _machine_env(shared, worker_root)
        worker = launch_worker(worker_env, tmp_path / "worker.log", "carcert-test-s3")
        try:
            with run_server(
                api_env, tmp_path / "api.log", keys={"alice": create_key(db_url, "alice")}
            ) as api:
                torch.manual_seed(0)
                wpath = tmp_path / "init.safetensors"
                save_weights(build_model("small_cnn", 10, 1), wpath)
                sent = wpath.read_bytes()
                with api.client("alice") as alice:
                    r = alice.post(
                        "/artifacts", files={"file": ("init.safetensors", sent)}, data={"kind": "weights"}
                    )
                    assert r.status_code == 201, r.text
                    art = r.json()

                    # the upload is an object in the bucket with the sent bytes, and no machine keeps a copy
                    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]]
                    assert len(listed) == 1
                    weights_key = listed[0].removeprefix(PREFIX)
                    assert _object_sha(s3, weights_key) == hashlib.sha256(sent).hexdigest() == art["sha256"]
                    assert _cached_blobs(api_root) == _cached_blobs(worker_root) == set()

                    spec = {
                        **TINY_JOB,
                        "model": {"arch": "small_cnn", "weights": art["ref"]},
                        "pruning": {**TINY_JOB["pruning"], "method": "lmp", "pretrain_epochs": 0},
                    }
                    r = alice.post("/jobs", json=spec)
                    assert r.status_code == 202, r.text
                    job_id = r.json()["id"]
                    job = poll_job(alice, job_id, 240)
                    assert job["status"] == "succeeded", (job, worker.log()[-3000:])

                    # the worker machine read the weights from the bucket, not from the API's disk
                    assert weights_key in _cached_blobs(worker_root)
                    assert weights_key not in _cached_blobs(api_root)

                    # its outputs are objects in the bucket; the API serves those bytes
                    outputs = {
                        o["Key"].removeprefix(PREFIX)
                        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]
                    } - {weights_key}
                    assert len(outputs) == 4  # model, mask, evidence, the report's examples.npz
                    served = {}
                    for what in ("model", "mask"):
                        r = alice.get(f"/jobs/{job_id}/{what}")
                        assert r.status_code == 200, r.text
                        sha = hashlib.sha256(r.content).hexdigest()
                        assert r.headers["x-content-sha256"] == sha
                        served[what] = sha
                    assert set(served.values()) <= {_object_sha(s3, k) for k in outputs}
                    assert len(_cached_blobs(api_root) & outputs) == 2  # fetched from the bucket to serve
                    cert = alice.get(f"/jobs/{job_id}/certificate").json()
                    assert (
                        cert["mask_sha256"] == served["mask"] and cert["model"]["sha256"] == served["model"]
                    )
        finally:
            worker.stop()
