"""End to end as a user runs it. `carcert up`: the embedded all-in-one (SQLite + kombu SQLAlchemy
broker + local artifacts) runs a real job end to end through the REST API, reuses its API key, and
stops API and worker on Ctrl-C; `carcert demo --quick` runs the README's demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from carcert.cli_service import free_port
from tests.integration.service_helpers import TINY_JOB, python_env, wait_for

pytestmark = pytest.mark.integration  # a real Celery worker (on SQLite: no Postgres / Redis needed)


def worker_pids(up_pid: int) -> list[int]:
    """Celery workers started by the `carcert up` process `up_pid` (named carcert-<pid>@host)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"celery" in b" ".join(cmd) and f"carcert-{up_pid}@%h".encode() in cmd:
            pids.append(int(proc.name))
    return pids


def start_up(cwd: Path, port: int, *extra: str, env_extra: dict[str, str] | None = None
             ) -> tuple[subprocess.Popen, Path]:
    # the embedded service must not inherit another test's CARCERT_* configuration
    env = {k: v for k, v in python_env({}).items() if not k.startswith("CARCERT_")}
    env.update(env_extra or {})
    log = cwd / f"up-{port}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carcert.cli", "up", "--port", str(port), "--var", "var", *extra],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"carcert up exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 90, what="carcert up to answer /healthz")
    return proc, log


def stop_up(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


def test_carcert_up_runs_a_job_and_stops_cleanly(tmp_path):
    port = free_port()
    proc, log = start_up(tmp_path, port)
    try:
        key = (tmp_path / "var" / "api_key").read_text().strip()
        assert key in log.read_text()  # printed for the user, with the URL
        assert f"http://127.0.0.1:{port}" in log.read_text()
        assert (tmp_path / "var" / "carcert.db").is_file() and (tmp_path / "var" / "broker.db").is_file()
        assert len(worker_pids(proc.pid)) == 1
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/jobs", timeout=10).status_code == 401
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        r = httpx.post(f"{base}/jobs", json=TINY_JOB, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        seen_running = []

        def finished():
            job = httpx.get(f"{base}/jobs/{job_id}", headers=auth, timeout=10).json()
            if job["status"] == "running":
                seen_running.append(job["progress"])
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_for(finished, 240, interval=0.5, what="the job to finish")
        assert job["status"] == "succeeded", job.get("error")
        assert job["progress"] == 1.0 and seen_running and seen_running == sorted(seen_running)
        cert = httpx.get(f"{base}/jobs/{job_id}/certificate", headers=auth, timeout=10)
        assert cert.status_code == 200 and cert.json()["job_id"] == job_id
        assert len(cert.json()["samples"]) == TINY_JOB["certification"]["samples"]
        model = httpx.get(f"{base}/jobs/{job_id}/model", headers=auth, timeout=10)
        assert model.status_code == 200 and len(model.content) > 1000
        stored = list((tmp_path / "var" / "artifacts").rglob("*"))
        assert sum(p.is_file() for p in stored) >= 3  # model, mask, evidence on the local disk
    finally:
        code = stop_up(proc)
    assert code == 0, log.read_text()
    assert "stopping the worker" in log.read_text()
    wait_for(lambda: not worker_pids(proc.pid), 30, what="the worker to exit")

    # a second start reuses the stored key and the database
    proc2, log2 = start_up(tmp_path, free_port())
    try:
        printed = re.search(r"API key \(.*\): (cc_\S+)", log2.read_text())
        assert printed and printed.group(1) == key
    finally:
        assert stop_up(proc2) == 0


def test_demo_quick_runs_end_to_end(tmp_path):
    """`carcert demo` (the README's main command, here its --quick size) starts the embedded service,
    runs a real job, prints the numbers, saves the certificate and model, and shuts down."""
    env = {k: v for k, v in python_env({}).items() if not k.startswith("CARCERT_")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "carcert.cli",
            "demo",
            "--quick",
            "--var",
            str(tmp_path / "var"),
            "--timeout",
            "240",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    job_id = re.search(r"job ([0-9a-f]{32}) succeeded", out).group(1)
    acc = float(re.search(r"accuracy\s+([\d.]+)%", out).group(1))
    pca = float(re.search(r"PCA\s+([\d.]+)%", out).group(1))
    assert 0 <= acc <= 100 and 0 <= pca <= 100
    saved = tmp_path / "var" / "demo" / job_id
    cert = json.loads((saved / "certificate.json").read_text())
    assert cert["job_id"] == job_id
    assert pca == pytest.approx(100 * cert["pca"], abs=0.051)  # printed with one decimal
    assert (saved / "model.safetensors").stat().st_size > 1000
    assert "embedded service stopped" in out


def test_worker_sigkill_is_survived_and_the_job_resumes(tmp_path):
    """SIGKILL of `carcert up`'s worker mid-job: the API stays up, the supervisor starts a new
    worker and hands the dead worker's job back at once (no wait for its 60 s lease), and the job
    resumes from its checkpoints and succeeds on attempt 2."""
    port = free_port()
    proc, log = start_up(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {(tmp_path / 'var' / 'api_key').read_text().strip()}"}
    # a search of some seconds, so the kill lands mid-job with checkpoints on disk
    spec = {**TINY_JOB, "pruning": {**TINY_JOB["pruning"], "pretrain_epochs": 2, "search_epochs": 8}}
    try:
        r = httpx.post(f"{base}/jobs", json=spec, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def job() -> dict:
            return httpx.get(f"{base}/jobs/{job_id}", headers=auth, timeout=10).json()

        wait_for(lambda: job()["stage"] == "search", 180, interval=0.2, what="the job to reach the search")
        checkpoints = tmp_path / "var" / "work" / job_id / "checkpoints"
        wait_for(lambda: any(checkpoints.glob("*search*.pt")), 120, what="a search checkpoint on disk")
        (victim,) = worker_pids(proc.pid)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # the API is still up
        new = wait_for(lambda: [p for p in worker_pids(proc.pid) if p != victim], 60, what="a new worker")
        assert len(new) == 1 and proc.poll() is None
        # resumed by the new worker well within the dead worker's 60 s lease
        wait_for(
            lambda: job()["status"] == "running" and job()["attempts"] == 2,
            45,
            interval=0.2,
            what="the job to run again",
        )
        assert time.monotonic() - killed_at < 55
        done = wait_for(
            lambda: (j := job())["status"] in ("succeeded", "failed", "cancelled") and j, 240, interval=0.5
        )
        assert done["status"] == "succeeded" and done["attempts"] == 2, done.get("error")
        assert httpx.get(f"{base}/jobs/{job_id}/certificate", headers=auth, timeout=10).status_code == 200
        assert "restarting it" in log.read_text()
        worker_log = (tmp_path / "var" / "worker.log").read_text(errors="replace")
        assert re.search(rf"job {job_id} attempt 2 resumes from checkpoints .*search", worker_log), (
            worker_log[-3000:]
        )
    finally:
        code = stop_up(proc)
    assert code == 0, log.read_text()
    wait_for(lambda: not worker_pids(proc.pid), 30, what="the worker to exit")
