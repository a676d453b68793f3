"""The whole path over real HTTP: upload weights -> POST /jobs -> the real Celery worker (shared
fixture `celery_worker_proc`, Postgres + Redis) runs core.pipeline -> poll until succeeded -> GET
the certificate, mask and model; the downloads' sha256 equals the header and the stored artifact,
the mask keeps exactly round((1 - r) n) weights per layer and the model is zero where it is 0."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from sqlalchemy import create_engine, text

from tests.integration.api_harness import assert_problem, poll_job, serve_with_worker
from tests.integration.service_helpers import TINY_JOB

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(settings_env, celery_worker_proc, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("api") / "server.log"
    with serve_with_worker(settings_env, celery_worker_proc, log_path) as srv:
        yield srv


def stored_sha(db_url: str, job_id: str, column: str) -> str:
    engine = create_engine(db_url)
    with engine.connect() as c:
        sha = c.execute(
            text(
                f"SELECT a.sha256 FROM job_results r JOIN artifacts a ON a.id = r.{column} "
                "WHERE r.job_id = :j"
            ),
            {"j": job_id},
        ).scalar_one()
    engine.dispose()
    return sha


def test_upload_submit_run_and_download(api, settings_env):
    from core.models import build_model, load_weights, save_weights

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    wpath = api.log_path.parent / "init.safetensors"
    save_weights(model, wpath)
    data = wpath.read_bytes()
    with api.client("alice") as alice, api.client("bob") as bob:
        r = alice.post("/artifacts", files={"file": ("init.safetensors", data)}, data={"kind": "weights"})
        assert r.status_code == 201, r.text
        art = r.json()
        assert art["sha256"] == hashlib.sha256(data).hexdigest()

        spec = {
            **TINY_JOB,
            "model": {"arch": "small_cnn", "weights": art["ref"]},
            "pruning": {**TINY_JOB["pruning"], "method": "lmp", "pretrain_epochs": 0},
        }
        r = alice.post("/jobs", json=spec, headers={"Idempotency-Key": "happy-path"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/jobs/{job_id}"

        job = poll_job(alice, job_id, timeout=240)
        assert job["status"] == "succeeded", (job, api.worker.log()[-3000:])
        assert job["progress"] == 1.0 and job["finished_at"] and job["started_at"]
        assert [v["name"] for v in job["summary"]["variants"]] == ["lmp-0.50"]

        # certificate: the DESIGN.md document of this job; the cached fast path gives the same bytes
        r1 = alice.get(f"/jobs/{job_id}/certificate")
        assert r1.status_code == 200, r1.text
        cert = r1.json()
        assert cert["job_id"] == job_id
        assert len(cert["samples"]) == TINY_JOB["certification"]["samples"]
        assert cert["params"]["n"] == TINY_JOB["certification"]["n"]
        assert cert["pca"] == pytest.approx(
            sum(s["certified"] and s["pred"] == s["label"] for s in cert["samples"]) / len(cert["samples"])
        )
        r2 = alice.get(f"/jobs/{job_id}/certificate")
        assert r2.content == r1.content and r2.headers["etag"] == r1.headers["etag"]
        assert r1.headers["etag"] == '"' + hashlib.sha256(r1.content).hexdigest() + '"'
        assert (
            alice.get(
                f"/jobs/{job_id}/certificate", headers={"If-None-Match": r1.headers["etag"]}
            ).status_code
            == 304
        )
        assert alice.get(f"/jobs/{job_id}/certificate", params={"variant": "lmp-0.50"}).json() == cert
        assert_problem(alice.get(f"/jobs/{job_id}/certificate", params={"variant": "car-0.90"}), 404)
        assert_problem(bob.get(f"/jobs/{job_id}/certificate"), 404)  # also once cached

        # mask and model: sha256 header == body == the stored artifact
        files = {}
        for what, column in (("mask", "mask_artifact_id"), ("model", "model_artifact_id")):
            r = alice.get(f"/jobs/{job_id}/{what}")
            assert r.status_code == 200, r.text
            digest = hashlib.sha256(r.content).hexdigest()
            assert r.headers["x-content-sha256"] == digest
            assert r.headers["etag"] == f'"{digest}"'
            assert digest == stored_sha(settings_env["CARCERT_DATABASE_URL"], job_id, column)
            assert_problem(bob.get(f"/jobs/{job_id}/{what}"), 404)
            files[what] = r.content
        assert cert["mask_sha256"] == hashlib.sha256(files["mask"]).hexdigest()

        masks = {k: v.bool() for k, v in st_load(files["mask"]).items()}
        weights = st_load(files["model"])
        assert masks
        for name, m in masks.items():
            assert int(m.sum()) == round((1 - 0.5) * m.numel()), name
            assert bool((weights[name][~m] == 0).all()), name
        path = api.log_path.parent / "pruned.safetensors"
        path.write_bytes(files["model"])
        load_weights(build_model("small_cnn", 10, 1), path)  # loads into a plain model

        # idempotent replay after the run: the same job, 200
        again = alice.post("/jobs", json=spec, headers={"Idempotency-Key": "happy-path"})
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert_problem(alice.post(f"/jobs/{job_id}/cancel"), 409)

        # a result blob lost on the server: 500 problem, no path or stack trace in the answer
        root = Path(settings_env["CARCERT_ARTIFACT_ROOT"])
        engine = create_engine(settings_env["CARCERT_DATABASE_URL"])
        with engine.connect() as c:
            key = c.execute(
                text(
                    "SELECT a.storage_key FROM job_results r JOIN artifacts a "
                    "ON a.id = r.mask_artifact_id WHERE r.job_id = :j"
                ),
                {"j": job_id},
            ).scalar_one()
        engine.dispose()
        (root / key).unlink()
        r = alice.get(f"/jobs/{job_id}/mask")
        assert_problem(r, 500)
        assert str(root) not in r.text and key not in r.text


def test_cancel_a_running_job(api):
    slow = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "pretrain_epochs": 200}, "train_subset": None}
    with api.client("alice") as alice:
        job_id = alice.post("/jobs", json=slow).json()["id"]
        poll_job(alice, job_id, timeout=120, done=("running", "succeeded", "failed", "cancelled"))
        r = alice.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 202, r.text
        assert r.json()["cancel_requested"] is True
        job = poll_job(alice, job_id, timeout=120)
        assert job["status"] == "cancelled", job
        assert_problem(alice.get(f"/jobs/{job_id}/certificate"), 409)


def test_sweep_job_certificates_and_variant_downloads(api):
    """A sweep (lmp at two prune ratios + unpruned vanilla): the certificate endpoint lists every
    variant, ?variant= picks one, mask/model downloads need ?variant= and the masks keep
    round((1 - r) n) weights per layer for their own ratio r."""
    ratios = [0.3, 0.7]
    spec = {
        **TINY_JOB,
        "pruning": {**TINY_JOB["pruning"], "method": "lmp", "pretrain_epochs": 1, "finetune_epochs": 0},
        "sweep_methods": ["vanilla", "lmp"],
        "sweep_prune_ratios": ratios,
        "certification": {**TINY_JOB["certification"], "samples": 2},
        "train_subset": 200,
    }
    with api.client("alice") as alice:
        job_id = alice.post("/jobs", json=spec).json()["id"]
        job = poll_job(alice, job_id, timeout=240)
        assert job["status"] == "succeeded", (job, api.worker.log()[-3000:])
        doc = alice.get(f"/jobs/{job_id}/certificate").json()
        entries = {e["name"]: e for e in doc["certificates"]}
        assert set(entries) == {"vanilla-0.00", "lmp-0.30", "lmp-0.70"}
        for name, e in entries.items():
            assert e["method"] == name.split("-")[0]
            assert e["prune_ratio"] == pytest.approx(float(name.split("-")[1]))
            assert len(e["certificate"]["samples"]) == 2 and e["certificate"]["job_id"] == job_id
        one = alice.get(f"/jobs/{job_id}/certificate", params={"variant": "lmp-0.30"}).json()
        assert one == entries["lmp-0.30"]["certificate"]

        body = assert_problem(alice.get(f"/jobs/{job_id}/mask"), 422)
        assert "lmp-0.30" in body["detail"] and "lmp-0.70" in body["detail"]
        assert_problem(alice.get(f"/jobs/{job_id}/mask", params={"variant": "vanilla-0.00"}), 404)
        for r in ratios:
            name = f"lmp-{r:.2f}"
            resp = alice.get(f"/jobs/{job_id}/mask", params={"variant": name})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-content-sha256"] == hashlib.sha256(resp.content).hexdigest()
            assert entries[name]["certificate"]["mask_sha256"] == resp.headers["x-content-sha256"]
            for layer, m in st_load(resp.content).items():
                assert int(m.bool().sum()) == round((1 - r) * m.numel()), (name, layer)
        model = alice.get(f"/jobs/{job_id}/model", params={"variant": "vanilla-0.00"})
        assert model.status_code == 200
        assert model.headers["x-content-sha256"] == hashlib.sha256(model.content).hexdigest()
