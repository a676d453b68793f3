"""Helpers of the service integration tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# the smallest real job: seconds on one CPU core
TINY_JOB: dict[str, Any] = {
    "kind": "prune",
    "model": {"arch": "small_cnn"},
    "dataset": "digits",
    "transform": {"kind": "parametric", "name": "illumination"},
    "pruning": {
        "method": "car",
        "prune_ratio": 0.5,
        "pretrain_epochs": 1,
        "search_epochs": 1,
        "finetune_epochs": 1,
        "augment_q": 50,
        "batch_size": 64,
    },
    "certification": {"n": 10, "l": 2, "samples": 5, "t_steps": 50},
    "train_subset": 300,
    "seed": 0,
}


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class WorkerProc:
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc, self.log_path = proc, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def launch_worker(env: dict[str, str], log_path: Path, name: str, ready_timeout: float = 90) -> WorkerProc:
    from carcert.cli_service import worker_command

    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    cmd = worker_command(
        pool="solo", concurrency=1, loglevel="info", queue=env.get("CARCERT_QUEUE", "carcert")
    )
    cmd[cmd.index("--hostname") + 1] = f"{name}@%h"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=full_env, stdout=logf, stderr=subprocess.STDOUT)
    worker = WorkerProc(proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.log()[-3000:]}")
        return " ready." in worker.log()

    try:
        wait_for(ready, ready_timeout, what=f"worker {name} to be ready")
    except BaseException:
        worker.stop()
        raise
    return worker


def python_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ + `extra` + PYTHONPATH on the repository (for subprocesses)."""
    return {**os.environ, **extra, "PYTHONPATH": str(ROOT)}


@contextmanager
def sqlite_service(tmp_path: Path, **overrides: str) -> Iterator[dict[str, str]]:
    """In-process service settings on a fresh migrated SQLite database and SQLite broker under
    `tmp_path` (CARCERT_* env vars, restored afterwards); `overrides` adds or replaces variables."""
    from store.db import get_engine, init_db, reset_caches

    env = {
        "CARCERT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "CARCERT_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "CARCERT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "CARCERT_WORK_ROOT": str(tmp_path / "work"),
        "CARCERT_PROGRESS_INTERVAL_S": "0.5",
        **overrides,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_caches()
    init_db()
    try:
        yield env
    finally:
        get_engine().dispose()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_caches()


def claimed_job(worker: str = "w1") -> str:
    """A small queued job created and claimed by `worker` on the current database; its id."""
    from core.spec import JobSpec
    from store import jobs as repo
    from store.db import session_scope

    with session_scope() as s:
        job, _ = repo.create_job(s, "t", JobSpec(train_subset=50))
    with session_scope() as s:
        assert repo.claim_job(s, job.id, worker) is not None
    return job.id


def job_row(job_id: str):
    """The Job row as it is in the database now."""
    from store.db import session_scope
    from store.models import Job

    with session_scope() as s:
        return s.get(Job, job_id)
