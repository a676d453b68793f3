"""CarcertClient and the `carcert submit|jobs|job|certificate|cancel|download` CLI against a real
uvicorn server on Postgres, with a real job run by the worker code (tests/integration/
client_harness.py). Skipped only when Postgres is unreachable."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from carcert import cli
from carcert.client import CarcertAPIError, CarcertClient
from core.errors import InvalidInput
from tests.integration.client_harness import TINY_SPEC, run_job_to_end, serve, start_runner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("client-server")) as s:
        yield s


@pytest.fixture(scope="module")
def alice(server):
    with CarcertClient(server.url, server.keys["alice"], timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def done_job(server, alice, tmp_path_factory):
    """A tiny real job run to completion; observed through client.wait from another thread."""
    job = alice.submit(TINY_SPEC, idempotency_key="done-job")
    seen: list[dict] = []
    out: dict = {}
    waiter = threading.Thread(
        target=lambda: out.update(alice.wait(job["id"], on_progress=seen.append, poll=0.2))
    )
    waiter.start()
    run_job_to_end(server, job["id"], tmp_path_factory.mktemp("runner") / "runner.log")
    waiter.join(60)
    assert not waiter.is_alive()
    return out, seen


def test_upload_artifact_returns_the_local_sha256(alice, tmp_path):
    from core.models import build_model, save_weights

    path = tmp_path / "w.safetensors"
    save_weights(build_model("small_cnn", 10, 1), path)
    art = alice.upload_artifact(path, "weights")
    assert art["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert art["size"] == path.stat().st_size
    assert art["ref"] == f"artifact:{art['id']}"
    with pytest.raises(InvalidInput, match="no such file"):
        alice.upload_artifact(tmp_path / "missing.safetensors")


def test_submit_is_idempotent_and_conflicts_are_problem_errors(alice):
    spec = dict(TINY_SPEC, seed=11)
    first = alice.submit(spec, idempotency_key="idem-1")
    again = alice.submit(spec, idempotency_key="idem-1")
    assert again["id"] == first["id"] and first["status"] == "queued"
    with pytest.raises(CarcertAPIError) as info:
        alice.submit(dict(TINY_SPEC, seed=12), idempotency_key="idem-1")
    assert info.value.status == 409 and first["id"] in info.value.detail
    assert info.value.body["type"].endswith("idempotency-conflict")


def test_server_side_validation_error_is_parsed(alice):
    with pytest.raises(CarcertAPIError) as info:
        alice.submit(dict(TINY_SPEC, dataset="npz:/etc/passwd"))
    assert info.value.status == 422
    assert info.value.title and info.value.detail
    assert info.value.body["status"] == 422


def test_list_jobs_pages_through_everything(server):
    with CarcertClient(server.url, server.keys["bob"]) as bob:
        ids = [bob.submit(dict(TINY_SPEC, seed=100 + i))["id"] for i in range(7)]
        listed = [j["id"] for j in bob.list_jobs(limit=3)]  # 3 pages
        assert sorted(listed) == sorted(ids) and len(set(listed)) == 7
        assert listed == list(reversed(ids))  # newest first
        bob.cancel(ids[0])
        assert [j["id"] for j in bob.list_jobs(status="cancelled", limit=2)] == [ids[0]]
        assert {j["id"] for j in bob.list_jobs(status="queued", limit=2)} == set(ids[1:])


def test_other_tenant_sees_404_and_bad_key_401(server, alice):
    job = alice.submit(dict(TINY_SPEC, seed=200))
    with CarcertClient(server.url, server.keys["bob"]) as bob, pytest.raises(CarcertAPIError) as info:
        bob.get_job(job["id"])
    assert info.value.status == 404 and info.value.title == "Not Found"
    with CarcertClient(server.url, "cc_wrong") as bad, pytest.raises(CarcertAPIError) as info:
        bad.get_job(job["id"])
    assert info.value.status == 401


def test_cancel_a_queued_job_is_idempotent(alice):
    job = alice.submit(dict(TINY_SPEC, seed=300))
    assert alice.cancel(job["id"])["status"] == "cancelled"
    assert alice.get_job(job["id"])["status"] == "cancelled"
    assert alice.cancel(job["id"])["status"] == "cancelled"  # (a succeeded job answers 409: CLI test)


def test_results_before_success_are_409(alice, tmp_path):
    job = alice.submit(dict(TINY_SPEC, seed=400))
    with pytest.raises(CarcertAPIError) as info:
        alice.certificate(job["id"])
    assert info.value.status == 409 and "queued" in info.value.detail
    with pytest.raises(CarcertAPIError):
        alice.download_model(job["id"], tmp_path)


def test_wait_sees_progress_and_the_final_job(done_job):
    final, seen = done_job
    assert final["status"] == "succeeded" and final["progress"] == 1.0
    assert seen[-1]["status"] == "succeeded"
    assert seen[0]["status"] in ("queued", "running")
    progresses = [j["progress"] for j in seen]
    assert progresses == sorted(progresses)  # never goes backwards
    assert len({(j["status"], j["stage"], j["progress"]) for j in seen}) == len(seen)  # changes only


def test_certificate_matches_its_samples(alice, done_job):
    final, _ = done_job
    cert = alice.certificate(final["id"])
    assert cert["job_id"] == final["id"]
    samples = cert["samples"]
    assert len(samples) == TINY_SPEC["certification"]["samples"]
    eps = cert["params"]["epsilon"]
    for s in samples:  # the certified flag follows METHOD.md: correct and eps_hat <= epsilon
        assert s["certified"] == (s["pred"] == s["label"] and s["epsilon_bound"] <= eps)
    assert cert["pca"] == pytest.approx(sum(s["certified"] for s in samples) / len(samples))


def test_downloads_are_sha256_checked_and_loadable(alice, done_job, tmp_path):
    from core.masking import load_masks
    from core.models import build_model, load_weights

    final, _ = done_job
    cert = alice.certificate(final["id"])
    model_path = alice.download_model(final["id"], tmp_path / "model.safetensors")
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == cert["model"]["sha256"]
    model = build_model("small_cnn", 10, 1)
    load_weights(model, model_path)
    mask_path = alice.download_mask(final["id"], tmp_path, variant="lmp-0.50")
    assert mask_path.parent == tmp_path
    assert hashlib.sha256(mask_path.read_bytes()).hexdigest() == cert["mask_sha256"]
    masks = load_masks(mask_path)
    params = dict(model.named_parameters())
    for name, m in masks.items():  # exact top-k count per layer, and the weights are zero off-mask
        assert int(m.sum()) == round(0.5 * m.numel())
        assert torch.count_nonzero(params[name].detach()[~m]) == 0


def test_evidence_over_rest_lets_a_service_user_verify(server, alice, done_job, tmp_path, capsys,
                                                       monkeypatch):
    """Issue 10, point 4: GET /jobs/{id}/evidence (its X-Evidence-SHA256 is the certificate's
    evidence_sha256), `carcert download JOB evidence` and CarcertClient.download_evidence; with the
    certificate, model and mask from the same API, `carcert verify --recompute` passes."""
    import httpx

    from core.certify import evidence_sha256, load_evidence

    final, _ = done_job
    cert = alice.certificate(final["id"])
    assert final["links"]["evidence"] == f"/jobs/{final['id']}/evidence"
    r = httpx.get(f"{server.url}/jobs/{final['id']}/evidence",
                  headers={"Authorization": f"Bearer {server.keys['alice']}"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-evidence-sha256"] == cert["evidence_sha256"]
    assert r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
    bob = httpx.get(f"{server.url}/jobs/{final['id']}/evidence",
                    headers={"Authorization": f"Bearer {server.keys['bob']}"}, timeout=30)
    assert bob.status_code == 404 and bob.headers["content-type"] == "application/problem+json"

    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "certificate.json").write_text(json.dumps(cert))
    ev = alice.download_evidence(final["id"], folder / "evidence.npz")
    assert ev.read_bytes() == r.content
    arrays = load_evidence(ev)
    assert evidence_sha256(*(arrays[k] for k in ("z", "deltas", "p", "labels", "indices")),
                           arrays.get("draws")) == cert["evidence_sha256"]
    alice.download_model(final["id"], folder / "model.safetensors")
    alice.download_mask(final["id"], folder / "mask.safetensors")
    capsys.readouterr()
    assert cli.main(["verify", str(folder / "certificate.json"), "--recompute"]) == 0
    assert "recomputed p and Z" in capsys.readouterr().out
    monkeypatch.setenv("CARCERT_URL", server.url)
    monkeypatch.setenv("CARCERT_API_KEY", server.keys["alice"])
    assert cli.main(["download", final["id"], "evidence", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{final['id']}-evidence.npz").read_bytes() == r.content


def test_cli_jobs_certificate_job_cancel(server, done_job, tmp_path, capsys, monkeypatch):
    final, _ = done_job
    monkeypatch.setenv("CARCERT_URL", server.url)
    monkeypatch.setenv("CARCERT_API_KEY", server.keys["alice"])
    assert cli.main(["jobs", "--status", "succeeded"]) == 0
    out = capsys.readouterr().out
    assert final["id"] in out and "succeeded" in out
    assert cli.main(["jobs", "--json", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("id" in json.loads(line) for line in lines)
    out_file = tmp_path / "cert.json"
    assert cli.main(["certificate", final["id"], "--out", str(out_file)]) == 0
    with CarcertClient(server.url, server.keys["alice"]) as c:
        assert json.loads(out_file.read_text()) == c.certificate(final["id"])
    assert cli.main(["job", final["id"], "--wait"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
    assert cli.main(["cancel", final["id"]]) == 1  # already finished: 409
    assert "409" in capsys.readouterr().err
    assert cli.main(["certificate", "nope", "--api-key", server.keys["bob"]]) == 1
    assert "404 Not Found" in capsys.readouterr().err
    monkeypatch.setenv("CARCERT_API_KEY", "cc_bad")
    assert cli.main(["jobs"]) == 1
    assert "CARCERT_API_KEY" in capsys.readouterr().err


def test_cli_submit_uploads_weights_and_waits(server, tmp_path, capsys, monkeypatch):
    """`carcert submit --weights local.safetensors --wait`: uploads, submits, shows the progress bar
    (stderr) while a worker runs the job, prints the final job and exits 0."""
    from core.models import build_model, save_weights

    weights = tmp_path / "pre.safetensors"
    save_weights(build_model("small_cnn", 10, 1), weights)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(TINY_SPEC))
    monkeypatch.setenv("CARCERT_URL", server.url)
    key = server.keys["alice"]
    procs = []

    def run_when_queued() -> None:  # plays the worker for the job the CLI submits
        with CarcertClient(server.url, key) as c:
            for _ in range(300):
                jobs = [j for j in c.list_jobs(status="queued") if j["spec"]["model"]["weights"]]
                if jobs:
                    procs.append(start_runner(server, jobs[0]["id"], tmp_path / "runner.log"))
                    return
                time.sleep(0.1)

    helper = threading.Thread(target=run_when_queued)
    helper.start()
    rc = cli.main(
        [
            "submit",
            str(spec_file),
            "--weights",
            str(weights),
            "--method",
            "lmp",
            "--pretrain-epochs",
            "0",
            "--wait",
            "--poll",
            "0.2",
            "--api-key",
            key,
        ]
    )
    helper.join(10)
    for p in procs:
        p.wait(60)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    final = json.loads(captured.out)
    assert final["status"] == "succeeded"
    assert final["spec"]["model"]["weights"].startswith("artifact:")
    assert final["spec"]["pruning"]["pretrain_epochs"] == 0
    assert "uploaded" in captured.err and "100%" in captured.err


def test_cli_reports_unreachable_server(capsys):
    assert cli.main(["jobs", "--url", "http://127.0.0.1:9", "--timeout", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_client_download_to_missing_dir_fails_cleanly(alice, done_job, tmp_path):
    final, _ = done_job
    with pytest.raises(FileNotFoundError):
        alice.download_model(final["id"], tmp_path / "no" / "such" / "dir" / "m.safetensors")
    assert not list(Path(tmp_path).rglob("*.part"))
