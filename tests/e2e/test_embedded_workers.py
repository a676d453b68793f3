"""`carcert up --workers 2`: two supervised worker processes on the embedded SQLite database and
broker, torch threads split between them, run a sweep's variants in parallel (each worker claims
units) to the same certificates as `carcert up` with one worker."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from carcert.cli_service import free_port
from tests.e2e.test_embedded_up import start_up, stop_up
from tests.integration.service_helpers import TINY_JOB, wait_for

pytestmark = pytest.mark.integration

SWEEP = {**TINY_JOB, "sweep_methods": ["lmp"], "sweep_prune_ratios": [0.3, 0.5, 0.7],
         "pruning": {**TINY_JOB["pruning"], "finetune_epochs": 6}, "train_subset": 600,
         "certification": {**TINY_JOB["certification"], "samples": 30}, "seed": 2}


def _workers(up_pid: int) -> dict[int, dict[str, str]]:
    """{pid: environment} of the Celery workers `carcert up` process `up_pid` started."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            mine = any(a.startswith(f"carcert-{up_pid}".encode()) for a in cmd)
            if b"celery" not in b" ".join(cmd) or not mine:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        out[int(proc.name)] = {k.decode(): v.decode() for k, v in env.items()}
    return out


def _sweep(tmp_path: Path, *extra: str, env_extra: dict[str, str] | None = None
           ) -> tuple[dict[str, dict], dict[int, dict[str, str]], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc, log = start_up(tmp_path, port, *extra, env_extra=env_extra)
    try:
        key = (tmp_path / "var" / "api_key").read_text().strip()
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        n = int(extra[extra.index("--workers") + 1])
        worker_log = tmp_path / "var" / "worker.log"
        wait_for(lambda: worker_log.read_text().count(" ready.") >= n, 90, what=f"{n} worker(s) ready")
        workers = _workers(proc.pid)
        job_id = httpx.post(f"{base}/jobs", json=SWEEP, headers=auth, timeout=30).json()["id"]

        def finished():
            job = httpx.get(f"{base}/jobs/{job_id}", headers=auth, timeout=10).json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_for(finished, 300, interval=0.5, what="the sweep")
        assert job["status"] == "succeeded", job.get("error")
        assert [u["status"] for u in job["units"]] == ["succeeded"] * 3
        doc = httpx.get(f"{base}/jobs/{job_id}/certificate", headers=auth, timeout=10).json()
        certs = {}
        for e in doc["certificates"]:
            cert = dict(e["certificate"])
            cert.pop("job_id"), cert.pop("created_at")
            certs[e["name"]] = cert
        text = worker_log.read_text()
    finally:
        assert stop_up(proc) == 0, log.read_text()
    assert "Unrecoverable error" not in text
    return certs, workers, text


def test_up_with_two_workers_splits_threads_and_the_sweep(tmp_path) -> None:
    cores = os.cpu_count() or 1
    split = str(max(1, cores // 2))
    # the reference: one worker with the thread count each of the two gets (CPU bits depend on it)
    one, single, _ = _sweep(tmp_path / "one", "--workers", "1", env_extra={"CARCERT_TORCH_THREADS": split})
    two, pair, log = _sweep(tmp_path / "two", "--workers", "2")
    assert len(single) == 1 and [e["CARCERT_TORCH_THREADS"] for e in single.values()] == [split]
    assert len(pair) == 2
    assert sorted(e["CARCERT_WORKER_INDEX"] for e in pair.values()) == ["0", "1"]
    assert {e["CARCERT_TORCH_THREADS"] for e in pair.values()} == {split}
    claimed = {line.split("claimed by ")[1].split(":")[1] for line in log.splitlines() if " unit " in line
               and "claimed by " in line}
    assert claimed == {str(pid) for pid in pair}  # both workers ran variants
    assert sorted(two) == ["lmp-0.30", "lmp-0.50", "lmp-0.70"]
    assert one == two
