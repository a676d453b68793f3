"""`carcert up`'s worker supervisor: keeps one Celery worker subprocess alive.

When the worker exits while the service is up (a crash, the OOM killer, `kill -9`), the supervisor
(1) hands the jobs the dead worker held back at once: their leases (owner "<host>:<pid>:...") are
expired, so the new worker's start-up sweep dispatches them again and they resume from their
checkpoints instead of waiting for the lease to run out; (2) starts a new worker after a backoff
delay that doubles on each quick death (1, 2, 4, ... up to `max_delay` seconds) and starts again
from `base_delay` once a worker has lived `stable_after` seconds. The API keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("carcert.up")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM (Celery: warm shutdown), then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def release_dead_worker_jobs(pid: int) -> int:
    """Expire the leases of running jobs and job units (store.units) held by the (dead) worker
    process `pid` on this host; returns how many. The stale sweeps then re-dispatch them
    (store.jobs.stale_jobs, store.units.stale_units)."""
    from sqlalchemy import update

    from store.db import session_scope
    from store.models import Job, JobUnit, utcnow

    owner = f"{socket.gethostname()}:{pid}:%"
    n = 0
    with session_scope() as s:
        for table in (Job, JobUnit):
            res = s.execute(
                update(table)
                .where(table.status == "running", table.lease_owner.like(owner))
                .values(lease_expires_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            n += int(res.rowcount or 0)
    return n


class WorkerSupervisor:
    """Start `start()` (a callable returning a Popen) now and again whenever the process dies,
    until stop(). `on_death(pid)` runs first after each death (default: release_dead_worker_jobs);
    `on_restart(returncode, delay)` is told about each restart (for the console)."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen],
        *,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        on_restart: Callable[[int | None, float], Any] | None = None,
        on_death: Callable[[int], Any] = release_dead_worker_jobs,
    ) -> None:
        self._start = start
        self._on_death = on_death
        self.base_delay, self.max_delay, self.stable_after = base_delay, max_delay, stable_after
        self._on_restart = on_restart
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen = start()
        self.restarts = 0
        self._thread = threading.Thread(target=self._watch, name="carcert-worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        delay = self.base_delay
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            try:
                n = self._on_death(self.proc.pid)
                if n:
                    log.warning("handed back %d job(s) of the dead worker %d", n, self.proc.pid)
            except Exception as exc:  # the lease then simply expires on its own
                log.warning("could not hand back the dead worker's jobs: %s", exc)
            if time.monotonic() - started >= self.stable_after:
                delay = self.base_delay
            if self._on_restart is not None:
                self._on_restart(code, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._start()
                self.restarts += 1
            delay = min(delay * 2, self.max_delay)

    def stop(self, timeout: float = 20.0) -> int | None:
        """No more restarts; stop the current worker (SIGTERM, SIGKILL after `timeout`)."""
        with self._lock:
            self._stopping.set()
        return stop_process(self.proc, timeout)


def print_restart(log_path: Any) -> Callable[[int | None, float], None]:
    """on_restart callback that tells the console."""

    def report(code: int | None, delay: float) -> None:
        print(
            f"carcert up: the worker exited (code {code}); restarting it in {delay:.0f} s (see {log_path})",
            file=sys.stderr,
            flush=True,
        )

    return report
