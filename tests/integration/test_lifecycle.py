"""Job lifecycle through the real service: DELETE /jobs/{id} (409 while active, 204 with its rows and
produced blobs gone, inputs kept), retention (CARCERT_RETENTION_DAYS in a real process),
GET /jobs/{id}/logs and `carcert logs`, `carcert keys list|revoke`, and the job timings in
/metrics checked against the database. A uvicorn server on a fresh Postgres database; jobs run by
the real worker code (worker.runner.execute_job) in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from tests.integration.api_harness import (
    ROOT,
    assert_problem,
    create_key,
    fresh_database,
    run_server,
    server_env,
)
from tests.integration.client_harness import TINY_SPEC, run_job_to_end

pytestmark = pytest.mark.integration
TOKEN = "metrics-token-lifecycle"


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    with fresh_database() as db_url:
        env = server_env(
            db_url, tmp, CARCERT_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.db'}", CARCERT_METRICS_TOKEN=TOKEN
        )
        keys = {t: create_key(db_url, t) for t in ("alice", "bob")}
        with run_server(env, tmp / "uvicorn.log", keys=keys) as server:
            server.db = create_engine(db_url)
            server.tmp = tmp
            yield server
            server.db.dispose()


@pytest.fixture(scope="module")
def done(svc):
    """A succeeded job that started from uploaded weights; (job id, weights artifact id)."""
    from core.models import build_model, save_weights

    torch.manual_seed(0)
    weights = svc.tmp / "init.safetensors"
    save_weights(build_model("small_cnn", 10, 1), weights)
    with svc.client("alice") as alice:
        art = alice.post(
            "/artifacts", files={"file": ("init.safetensors", weights.read_bytes())}, data={"kind": "weights"}
        )
        assert art.status_code == 201, art.text
        spec = {
            **TINY_SPEC,
            "model": {"arch": "small_cnn", "weights": art.json()["ref"]},
            "name": "to-delete",
        }
        job_id = alice.post("/jobs", json=spec).json()["id"]
        run_job_to_end(svc, job_id, svc.tmp / "runner.log")
        assert alice.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    return job_id, art.json()["id"]


def _scalar(svc, sql: str, **params):
    with svc.db.connect() as c:
        return c.execute(text(sql), params).scalar_one()


def _column(svc, sql: str, **params) -> list:
    with svc.db.connect() as c:
        return [row[0] for row in c.execute(text(sql), params)]


def _cli(svc, *argv: str) -> subprocess.CompletedProcess:
    env = {**svc.env, "CARCERT_URL": svc.url, "CARCERT_API_KEY": svc.keys["alice"]}
    return subprocess.run(
        [sys.executable, "-m", "carcert.cli", *argv],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_logs_of_a_job(svc, done):
    job_id, _ = done
    with svc.client("alice") as alice, svc.client("bob") as bob:
        doc = alice.get(f"/jobs/{job_id}/logs").json()
        assert_problem(bob.get(f"/jobs/{job_id}/logs"), 404)
        tail = alice.get(f"/jobs/{job_id}/logs", params={"after": 2}).json()["lines"]
    lines = doc["lines"]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    text_ = "\n".join(line["message"] for line in lines)
    assert f"job {job_id} claimed by" in text_ and f"job {job_id} finished: succeeded" in text_
    stages = re.findall(rf"job {job_id}: stage (\S+)", text_)
    assert {"preparing", "finetune", "certify"} <= set(stages), stages  # weights given: no pretraining
    assert [line["seq"] for line in tail] == list(range(3, len(lines) + 1))
    out = _cli(svc, "logs", job_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].endswith(f"job {job_id} finished: succeeded")


def test_metrics_report_job_timings_from_the_database(svc, done):
    job_id, _ = done
    import httpx

    body = httpx.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    with svc.db.connect() as c:
        started, finished, created, stages = c.execute(
            text("SELECT started_at, finished_at, created_at, stage_seconds FROM jobs WHERE id = :j"),
            {"j": job_id},
        ).one()
    want = (finished - started).total_seconds()
    got = float(re.search(r'carcert_job_duration_seconds_sum\{status="succeeded"\} (\S+)', body).group(1))
    assert got == pytest.approx(want, abs=1e-3)
    assert 'carcert_job_duration_seconds_count{status="succeeded"} 1.0' in body
    wait = float(re.search(r'carcert_job_queue_wait_seconds_sum\{status="succeeded"\} (\S+)', body).group(1))
    assert wait == pytest.approx((started - created).total_seconds(), abs=1e-3)
    assert set(stages) >= {"preparing", "finetune", "certify"} and all(v >= 0 for v in stages.values())
    for stage, seconds in stages.items():
        m = re.search(rf'carcert_job_stage_seconds_sum\{{stage="{re.escape(stage)}"\}} (\S+)', body)
        assert m and float(m.group(1)) == pytest.approx(seconds, abs=1e-3)
    assert re.search(r"^carcert_workers 0\.0$", body, re.M)  # no worker process beats here
    assert "carcert_job_duration_seconds" not in httpx.get(svc.url + "/metrics").text  # token-only


def test_delete_refuses_active_jobs_and_removes_a_finished_one(svc, done):
    job_id, weights_id = done
    with svc.client("alice") as alice, svc.client("bob") as bob:
        queued = alice.post("/jobs", json={**TINY_SPEC, "seed": 3}).json()["id"]
        body = assert_problem(alice.delete(f"/jobs/{queued}"), 409)
        assert body["job_status"] == "queued" and "cancel" in body["detail"]
        alice.post(f"/jobs/{queued}/cancel")
        assert alice.delete(f"/jobs/{queued}").status_code == 204
        assert_problem(alice.get(f"/jobs/{queued}"), 404)
        assert_problem(alice.delete(f"/jobs/{queued}"), 404)

        keys = _column(
            svc,
            "SELECT a.storage_key FROM job_results r JOIN artifacts a ON a.id IN "
            "(r.model_artifact_id, r.mask_artifact_id, r.evidence_artifact_id) WHERE r.job_id = :j",
            j=job_id,
        )
        blobs = [Path(svc.env["CARCERT_ARTIFACT_ROOT"]) / k for k in keys]
        assert len(blobs) == 3 and all(b.is_file() for b in blobs)
        assert alice.get(f"/jobs/{job_id}/certificate").status_code == 200  # now in the API's cache
        assert_problem(bob.delete(f"/jobs/{job_id}"), 404)  # another tenant's: not found
        assert alice.delete(f"/jobs/{job_id}").status_code == 204
        assert_problem(alice.get(f"/jobs/{job_id}"), 404)
        assert_problem(alice.get(f"/jobs/{job_id}/certificate"), 404)  # not served from the cache
    assert not any(b.exists() for b in blobs)
    for table in ("job_results", "job_labels", "job_logs"):
        assert _scalar(svc, f"SELECT count(*) FROM {table} WHERE job_id = :j", j=job_id) == 0
    assert _scalar(svc, "SELECT count(*) FROM artifacts WHERE storage_key = ANY(:k)", k=keys) == 0
    assert _scalar(svc, "SELECT count(*) FROM artifacts WHERE id = :a", a=weights_id) == 1  # the input stays


def test_retention_deletes_old_finished_jobs_only(svc):
    with svc.client("alice") as alice:
        ids = [alice.post("/jobs", json={**TINY_SPEC, "seed": s}).json()["id"] for s in (11, 12, 13)]
        for job_id in ids[:2]:
            alice.post(f"/jobs/{job_id}/cancel")
    with svc.db.begin() as c:  # the first finished 10 days ago, the second just now
        c.execute(
            text("UPDATE jobs SET finished_at = finished_at - :d WHERE id = :j"),
            {"d": timedelta(days=10), "j": ids[0]},
        )
        c.execute(
            text("UPDATE jobs SET created_at = created_at - :d WHERE id = :j"),
            {"d": timedelta(days=20), "j": ids[2]},
        )
    code = "from store.retention import delete_expired_jobs; print(delete_expired_jobs())"
    env = {**svc.env, "CARCERT_RETENTION_DAYS": "5"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"
    remaining = set(_column(svc, "SELECT id FROM jobs WHERE id = ANY(:i)", i=ids))
    assert remaining == {ids[1], ids[2]}  # recent cancelled one and the old but still queued one stay
    with svc.client("alice") as alice:
        alice.post(f"/jobs/{ids[2]}/cancel")


def test_cli_keys_list_and_revoke(svc):
    key = create_key(svc.env["CARCERT_DATABASE_URL"], "carol")
    listing = _cli(svc, "keys", "list", "--tenant", "carol")
    assert listing.returncode == 0, listing.stderr
    (row,) = [line for line in listing.stdout.splitlines() if " carol " in line]
    key_id = row.split()[0]
    assert key[:11] + "..." in row and key not in listing.stdout  # only the prefix is shown
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(svc.url + "/jobs", headers=headers).status_code == 200
    revoked = _cli(svc, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert _cli(svc, "keys", "revoke", "nosuchkey").returncode == 1
    assert key_id not in _cli(svc, "keys", "list").stdout  # revoked keys only with --all
    assert key_id in _cli(svc, "keys", "list", "--all").stdout
    svc.db.dispose()
    assert _scalar(svc, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = :k", k=key_id)


def test_cli_names_labels_filter_and_delete(svc):
    """`carcert submit --name --label --webhook`, `carcert jobs --label` (AND), `carcert delete`."""
    tag = "cli-" + svc.keys["alice"][-6:].replace("_", "x").replace("-", "x")
    common = ["--dataset", "digits", "--method", "lmp", "--samples", "5"]
    made = {}
    for name, labels in (("one", ["run=" + tag, "env=prod"]), ("two", ["run=" + tag, "env=dev"])):
        flags = [x for label in labels for x in ("--label", label)]
        out = _cli(svc, "submit", *common, "--name", name, *flags)
        assert out.returncode == 0, out.stderr
        made[name] = json.loads(out.stdout)["id"]
    refused = _cli(svc, "submit", *common, "--webhook", "http://169.254.169.254/latest")
    assert refused.returncode == 2 and "webhook" in refused.stderr
    assert _cli(svc, "submit", *common, "--label", "no-equals-sign").returncode == 2
    listing = _cli(svc, "jobs", "--label", f"run={tag}", "--label", "env=prod")
    assert listing.returncode == 0, listing.stderr
    (row,) = [line for line in listing.stdout.splitlines()[1:] if line.strip()]
    assert row.startswith(made["one"]) and f"one  env=prod,run={tag}" in row
    assert _cli(svc, "delete", made["two"]).returncode == 1  # queued: 409 until cancelled
    with svc.client("alice") as alice:
        alice.post(f"/jobs/{made['two']}/cancel")
        alice.post(f"/jobs/{made['one']}/cancel")
    deleted = _cli(svc, "delete", made["two"])
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert [line for line in _cli(svc, "jobs", "--label", f"run={tag}").stdout.splitlines()[1:] if line] == [
        line
        for line in _cli(svc, "jobs", "--label", f"run={tag}", "--label", "env=prod").stdout.splitlines()[1:]
        if line
    ]
