"""Helpers of the service integration tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
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
