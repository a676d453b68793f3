"""A user's own network over REST: upload a torch.export program (kind "model") -> POST /jobs with
model.program -> the real Celery worker prunes it with lmp, hydra and car -> certificates that
verify from their stored evidence, and GET /jobs/{id}/model?format=pt2 returns a program that runs
with torch alone and has the reported sparsity. Bad programs are refused with 422 problem+json."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from carcert.cli import main
from core.certify import verify_certificate
from store import jobs as repo
from store.artifacts import get_artifact_store
from store.db import session_scope
from store.models import Artifact
from tests.integration.api_harness import ROOT, assert_problem, create_key, poll_job, run_server
from tests.integration.service_helpers import TINY_JOB
from tests.programs import FlatOut, NoWeights, TupleOut, TwoHeadGroupNet, export
from tests.unit.test_cli_program import load_alone

pytestmark = pytest.mark.integration

PRUNABLE = ["stem.weight", "grouped.weight", "depthwise.weight", "head_a.weight", "head_b.weight"]


@pytest.fixture(scope="module")
def api(settings_env, celery_worker_proc, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    env.update(settings_env, PYTHONPATH=str(ROOT))
    with run_server(env, tmp_path_factory.mktemp("api") / "server.log") as srv:
        srv.keys = {t: create_key(settings_env["CARCERT_DATABASE_URL"], t) for t in ("alice",)}
        srv.worker = celery_worker_proc
        yield srv


def _upload(client, path: Path, name: str | None = None):
    return client.post(
        "/artifacts", files={"file": (name or path.name, path.read_bytes())}, data={"kind": "model"}
    )


def _evidence(job_id: str, variant: str, dest: Path) -> Path:
    with session_scope() as s:
        res = next(r for r in repo.get_results(s, job_id) if r.name == variant)
        key = s.get(Artifact, res.evidence_artifact_id).storage_key
    dest.write_bytes(get_artifact_store().local_path(key).read_bytes())
    return dest


def test_program_job_lmp_hydra_car(api, tmp_path: Path, capsys) -> None:
    torch.manual_seed(2)
    net = export(TwoHeadGroupNet(), tmp_path / "net.pt2", "train")
    with api.client("alice") as alice:
        r = _upload(alice, net)
        assert r.status_code == 201, r.text
        ref = r.json()["ref"]
        spec = {
            **TINY_JOB,
            "model": {"program": ref},
            "pruning": {**TINY_JOB["pruning"], "search_epochs": 1, "finetune_epochs": 1},
            "sweep_methods": ["lmp", "hydra", "car"],
            "certification": {"n": 10, "l": 2, "samples": 4, "t_steps": 20},
            "train_subset": 200,
        }
        r = alice.post("/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = poll_job(alice, r.json()["id"], timeout=400)
        assert job["status"] == "succeeded", (job, api.worker.log()[-3000:])
        names = [v["name"] for v in job["summary"]["variants"]]
        assert names == ["lmp-0.50", "hydra-0.50", "car-0.50"]
        pt2s, certs = [], []
        for name in names:
            cert = alice.get(f"/jobs/{job['id']}/certificate", params={"variant": name}).json()
            assert cert["model"]["arch"] == "program"
            assert cert["model"]["program_sha256"] == hashlib.sha256(net.read_bytes()).hexdigest()
            (tmp_path / f"{name}.json").write_text(json.dumps(cert))
            ev = _evidence(job["id"], name, tmp_path / f"{name}.evidence.npz")
            assert verify_certificate(tmp_path / f"{name}.json", ev) == []
            r = alice.get(f"/jobs/{job['id']}/model", params={"variant": name, "format": "pt2"})
            assert r.status_code == 200, r.text
            assert r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
            assert r.headers["x-content-sha256"] == cert["model"]["pt2_sha256"]
            (tmp_path / f"{name}.pt2").write_bytes(r.content)
            pt2s.append(tmp_path / f"{name}.pt2")
            certs.append(cert)
        for cert, (nonzero, _acc) in zip(certs, load_alone(pt2s, PRUNABLE, tmp_path), strict=True):
            assert nonzero == cert["model"]["nonzero"]
            assert cert["model"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        # a certify job of the returned program, submitted by the CLI client (uploads it as kind "model")
        argv = [
            "submit",
            "--kind",
            "certify",
            "--model",
            str(pt2s[2]),
            "--dataset",
            "digits",
            "--transform",
            "illumination",
            "--n",
            "10",
            "--l",
            "2",
            "--samples",
            "4",
            "--url",
            api.url,
            "--api-key",
            api.keys["alice"],
        ]
        assert main(argv) == 0
        submitted = json.loads(capsys.readouterr().out)
        assert submitted["spec"]["model"]["program"].startswith("artifact:")
        done = poll_job(alice, submitted["id"], timeout=200)
        assert done["status"] == "succeeded", (done, api.worker.log()[-3000:])
        cert = alice.get(f"/jobs/{done['id']}/certificate").json()
        assert cert["model"]["nonzero"] == certs[2]["model"]["nonzero"]
        assert [s["pred"] for s in cert["samples"]] == [s["pred"] for s in certs[2]["samples"]]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/carcert-pwned",))


def test_bad_programs_are_422(api, tmp_path: Path) -> None:
    cases = {
        "noweights.pt2": export(NoWeights(), tmp_path / "noweights.pt2"),
        "tuple.pt2": export(TupleOut(), tmp_path / "tuple.pt2"),
        "flat.pt2": export(FlatOut(), tmp_path / "flat.pt2"),
        "static.pt2": export(TwoHeadGroupNet(), tmp_path / "static.pt2", dynamic_batch=False),
    }
    (tmp_path / "evil.pt2").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    reasons = {
        "noweights.pt2": "no conv or linear weight",
        "tuple.pt2": "one (N, classes) logits tensor",
        "flat.pt2": "one (N, classes) logits tensor",
        "static.pt2": "batch dimension is static",
        "evil.pt2": "not a torch.export .pt2 archive",
        "junk.pt2": "not a torch.export .pt2 archive",
    }
    with api.client("alice") as alice:
        for name in reasons:
            body = assert_problem(_upload(alice, cases.get(name, tmp_path / name)), 422)
            assert reasons[name] in body["detail"], (name, body["detail"])
        assert not Path("/tmp/carcert-pwned").exists()
        # a program for 3 x 8 x 8 inputs against digits (1 x 8 x 8): refused at submission
        rgb = export(TwoHeadGroupNet3(), tmp_path / "rgb.pt2", shape=(3, 8, 8))
        r = _upload(alice, rgb)
        assert r.status_code == 201, r.text
        body = assert_problem(
            alice.post("/jobs", json={**TINY_JOB, "model": {"program": r.json()["ref"]}}), 422
        )
        assert "(3, 8, 8)" in body["detail"] and "(1, 8, 8)" in body["detail"]
        # weights (kind "model", safetensors) are not a program
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
        r = _upload(alice, tmp_path / "w.safetensors")
        assert r.status_code == 201, r.text
        body = assert_problem(
            alice.post("/jobs", json={**TINY_JOB, "model": {"program": r.json()["ref"]}}), 422
        )
        assert "not a .pt2 program" in body["detail"]


class TwoHeadGroupNet3(TwoHeadGroupNet):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
