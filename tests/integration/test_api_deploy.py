"""GET /jobs/{id}/model?format=onnx|pt2 and `carcert download JOB model --format` against a real
uvicorn, Celery worker and Postgres: the ONNX model run by onnxruntime and the .pt2 run by torch
alone (carcert blocked) give the logits of the job's safetensors model, and both carry the
preprocessing and the certificate's hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from carcert import cli
from core.data import load_dataset
from core.models import build_model
from tests.deploy_helpers import run_onnx, run_pt2_alone
from tests.integration.api_harness import assert_problem, poll_job, serve_with_worker
from tests.integration.service_helpers import TINY_JOB

pytestmark = pytest.mark.integration
EXPORT_TIMEOUT = 180  # the first request exports (seconds on an idle core)


@pytest.fixture(scope="module")
def api(settings_env, celery_worker_proc, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("api") / "server.log"
    with serve_with_worker(settings_env, celery_worker_proc, log_path) as srv:
        yield srv


def _reference(weights: bytes, x: np.ndarray, tmp: Path) -> np.ndarray:
    """The downloaded safetensors in a freshly built small_cnn (digits: 1 x 8 x 8, 10 classes)."""
    (tmp / "w.safetensors").write_bytes(weights)
    net = build_model("small_cnn", 10, 1, small_input=True)
    net.load_state_dict(load_file(str(tmp / "w.safetensors")))
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def test_onnx_and_pt2_downloads_match_the_safetensors_model(api, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {api.keys['alice']}"}
    with httpx.Client(base_url=api.url, headers=auth, timeout=EXPORT_TIMEOUT) as alice:
        r = alice.post("/jobs", json=TINY_JOB)
        assert r.status_code == 202, r.text
        job = poll_job(alice, r.json()["id"], timeout=300, log=api.worker.log)
        assert job["status"] == "succeeded", job
        jid = job["id"]
        cert = alice.get(f"/jobs/{jid}/certificate").json()
        body = {k: v for k, v in cert.items() if k not in ("created_at", "job_id")}
        cert_sha = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        x = load_dataset("digits", seed=0).test_x[:50].numpy()
        ref = _reference(alice.get(f"/jobs/{jid}/model").content, x, tmp_path)

        r = alice.get(f"/jobs/{jid}/model", params={"format": "onnx"})
        assert r.status_code == 200, r.text
        assert r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
        assert r.headers["content-disposition"].endswith('model.onnx"')
        (tmp_path / "m.onnx").write_bytes(r.content)
        logits, meta = run_onnx(tmp_path / "m.onnx", x)
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
        assert meta["carcert.certificate_sha256"] == cert_sha
        assert meta["carcert.model_sha256"] == cert["model"]["sha256"]
        assert json.loads(meta["carcert.input_shape"]) == ["N", 1, 8, 8]
        # the second request serves the stored file
        again = alice.get(f"/jobs/{jid}/model", params={"format": "onnx"})
        assert again.headers["x-content-sha256"] == r.headers["x-content-sha256"]

        r = alice.get(f"/jobs/{jid}/model", params={"format": "pt2"})
        assert r.status_code == 200, r.text
        (tmp_path / "m.pt2").write_bytes(r.content)
        alone, text = run_pt2_alone(tmp_path / "m.pt2", x, tmp_path)
        np.testing.assert_allclose(alone, ref, atol=1e-5, rtol=0)
        assert json.loads(text)["carcert.certificate_sha256"] == cert_sha

        assert_problem(alice.get(f"/jobs/{jid}/model", params={"format": "tflite"}), 422)
    with api.client("bob") as bob:  # another tenant's job stays invisible
        assert_problem(bob.get(f"/jobs/{jid}/model", params={"format": "onnx"}), 404)

    conn = ["--url", api.url, "--api-key", api.keys["alice"]]
    assert cli.main(["download", jid, "model", "--format", "onnx", "--out", str(tmp_path), *conn]) == 0
    assert (tmp_path / f"{jid}-model.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert cli.main(["download", jid, "mask", "--format", "onnx", "--out", str(tmp_path), *conn]) == 2
