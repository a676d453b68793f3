"""Harness for the client / report / dashboard integration tests: a real uvicorn server (the API app
plus the report and dashboard routers) on a fresh migrated Postgres database (tests/integration/
api_harness.py), and the real worker code (worker.runner.execute_job, in a subprocess with the
server's environment) to run small jobs to completion. No mocks."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integration.api_harness import ROOT, Server, create_key, fresh_database, run_server, server_env

# A job that runs in seconds on one CPU core: digits (8x8), small CNN, one epoch per stage, a few
# certified samples.
TINY_SPEC: dict[str, Any] = {
    "dataset": "digits",
    "model": {"arch": "small_cnn"},
    "transform": {"kind": "parametric", "name": "brightness"},
    "pruning": {
        "method": "lmp",
        "prune_ratio": 0.5,
        "pretrain_epochs": 1,
        "search_epochs": 0,
        "finetune_epochs": 1,
        "augment_q": 50,
        "batch_size": 64,
    },
    "certification": {"n": 10, "l": 2, "samples": 12, "t_steps": 50, "batch_size": 256},
    "train_subset": 300,
    "seed": 0,
}


@contextlib.contextmanager
def serve(
    tmp: Path, tenants: tuple[str, ...] = ("alice", "bob"), startup_s: float = 60.0, **extra_env: str
) -> Iterator[Server]:
    """Fresh database + uvicorn (api_harness.run_server: the API app, which includes the report and
    dashboard routers) on a free port; API keys per tenant in server.keys. The broker is a private
    SQLite file, so no other test's worker sees our jobs. `extra_env`: further CARCERT_* settings."""
    with fresh_database() as db_url:
        env = server_env(db_url, tmp, CARCERT_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.db'}", **extra_env)
        keys = {t: create_key(db_url, t) for t in tenants}
        with run_server(env, tmp / "uvicorn.log", startup_s, keys) as server:
            yield server


def start_runner(server: Server, job_id: str, log_path: Path) -> subprocess.Popen:
    """The real worker code for one job (worker.runner.execute_job) in a subprocess. No Celery
    worker listens, so a sweep runs whole in this process (CARCERT_FAN_OUT=0) instead of being
    spread as unit tasks nobody would take."""
    code = (
        "import sys, torch; torch.set_num_threads(1); from worker.runner import execute_job; "
        "print(execute_job(sys.argv[1]))"
    )
    env = dict(server.env, OMP_NUM_THREADS="1", CARCERT_FAN_OUT="0")
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-c", code, job_id],
            cwd=str(ROOT),
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )


def run_job_to_end(server: Server, job_id: str, log_path: Path, timeout: float = 300.0) -> None:
    proc = start_runner(server, job_id, log_path)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if rc != 0:
        raise RuntimeError(f"runner exited {rc}:\n{log_path.read_text(errors='replace')[-4000:]}")
