"""Harness for the client / report / dashboard integration tests: a real uvicorn server (the API app
plus the report and dashboard routers) on a fresh migrated Postgres database (tests/integration/
api_harness.py), and the real worker code (worker.runner.execute_job, in a subprocess with the
server's environment) to run small jobs to completion. No mocks.

`create_app` is the uvicorn factory: api.main.create_app() with the report and dashboard routers
included unless api.main already wires them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.integration.api_harness import ROOT, Server, create_key, free_port, fresh_database, server_env

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


def create_app():
    """uvicorn factory: the API app with the report + dashboard routers."""
    from api.main import create_app as api_app
    from api.routers import dashboard, report

    app = api_app()
    paths = {getattr(r, "path", None) for r in app.routes}
    if "/jobs/{job_id}/report" not in paths:
        app.include_router(report.router)
    if "/ui" not in paths:
        app.include_router(dashboard.router)
    return app


@contextlib.contextmanager
def serve(
    tmp: Path, tenants: tuple[str, ...] = ("alice", "bob"), startup_s: float = 60.0
) -> Iterator[Server]:
    """Fresh database + uvicorn (this module's factory) on a free port; API keys per tenant in
    server.keys. The broker is a private SQLite file, so no other test's worker sees our jobs."""
    with fresh_database() as db_url:
        env = server_env(db_url, tmp, CARCERT_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.db'}")
        port = free_port()
        log_path = tmp / "uvicorn.log"
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.integration.client_harness:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
        ]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=logf, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", proc, env, log_path)
        server.keys = {t: create_key(db_url, t) for t in tenants}
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{server.log()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start in {startup_s} s:\n{server.log()}")
                time.sleep(0.1)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def start_runner(server: Server, job_id: str, log_path: Path) -> subprocess.Popen:
    """The real worker code for one job (worker.runner.execute_job) in a subprocess."""
    code = (
        "import sys, torch; torch.set_num_threads(1); from worker.runner import execute_job; "
        "print(execute_job(sys.argv[1]))"
    )
    env = dict(server.env, OMP_NUM_THREADS="1")
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
