"""Celery application, configured from store.settings.

Delivery guarantees: acks_late + task_reject_on_worker_lost + prefetch 1 (a message is acked only
after the task ran; a worker killed mid-task gives its message back), JSON only. Because some
brokers still lose messages (kombu's SQLAlchemy transport on kill -9, a Redis restart), the
database stays the source of truth: each worker re-dispatches stale jobs at start and every
settings.sweep_interval_s seconds (worker.queue.sweep_stale_jobs), and claim_job makes sure a job
runs at most once at a time.

Run: `celery -A worker.celery_app worker` (or `carcert worker`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

from celery import signals

from store.settings import Settings, get_settings
from worker.queue import adopt, make_celery, sweep_stale_jobs, sweep_stale_units
from worker.shutdown import SHUTTING_DOWN

log = logging.getLogger("carcert.worker")


app = make_celery()
adopt(app)  # dispatch from this process (runner._release) reuses the worker's app


# --- one GPU per worker process --------------------------------------------------------------------


def visible_gpus(settings: Settings) -> list[str]:
    """GPU ids to spread workers over: settings.gpus, else CUDA_VISIBLE_DEVICES, else ordinals
    0..n-1 for the n /dev/nvidiaN device files (counted without initialising CUDA; in a container
    the files keep the host numbers while CUDA numbers the visible devices from 0)."""
    if settings.gpus:
        return [str(g) for g in settings.gpus]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    count = sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    return [str(i) for i in range(count)]


def pin_gpu(index: int, settings: Settings | None = None) -> str | None:
    """Set CUDA_VISIBLE_DEVICES to one GPU chosen by the worker process index (round robin).
    Must run before torch initialises CUDA. Returns the chosen id (None without GPUs)."""
    gpus = visible_gpus(settings or get_settings())
    if not gpus:
        return None
    gpu = gpus[index % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


@signals.worker_process_init.connect
def _pin_child(**_: Any) -> None:
    """Prefork child: pin the GPU by the child's index (billiard numbers children 0..c-1)."""
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    base = get_settings().worker_index
    gpu = pin_gpu(base + (index or 0))
    log.info("worker process %s pinned to GPU %s", os.getpid(), gpu)
    set_torch_threads()


_MAIN_RUNS_TASKS = False


def set_torch_threads(settings: Settings | None = None) -> int | None:
    """Apply settings.torch_threads (CARCERT_TORCH_THREADS) to torch in the process that runs
    tasks; returns it (None: left at torch's default)."""
    threads = (settings or get_settings()).torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
        log.info("worker process %s uses %d torch thread(s)", os.getpid(), threads)
    return threads


@signals.worker_init.connect
def _pin_main(sender: Any = None, **_: Any) -> None:
    """solo / threads pools run tasks in the main process: pin it by settings.worker_index."""
    global _MAIN_RUNS_TASKS
    pool = str(getattr(sender, "pool_cls", "")).lower()
    if "prefork" not in pool and "processes" not in pool:
        _MAIN_RUNS_TASKS = True
        gpu = pin_gpu(get_settings().worker_index)
        log.info("worker %s pinned to GPU %s", os.getpid(), gpu)
        set_torch_threads()


# --- stale-job sweep (no beat needed) ---------------------------------------------------------------

_sweeper_stop = threading.Event()


def _sweep_loop(interval: float) -> None:
    if _MAIN_RUNS_TASKS:  # solo / threads: load torch and core now, not when the first job arrives
        try:
            import worker.runner  # noqa: F401
        except Exception:
            log.exception("cannot import the job runner")

    while True:
        for message, step in housekeeping_steps():
            try:
                n = step()
                if n:
                    log.warning(message, n)
            except Exception:  # the sweep must never kill the worker
                log.exception("housekeeping step %s failed", step.__name__)
        if interval <= 0 or _sweeper_stop.wait(interval):
            return


WORKER_NODE = f"{socket.gethostname()}:{os.getpid()}"


def record_beat() -> int:
    """This worker node is alive (worker_beats; /metrics counts the recent ones); rows of nodes
    silent for a day are dropped. Returns 0 (nothing to report)."""
    from store.db import session_scope
    from store.workers import beat, forget_workers

    with session_scope() as s:
        beat(s, WORKER_NODE)
        forget_workers(s, 86_400)
    return 0


def housekeeping_steps() -> list[tuple[str, Any]]:
    """What each sweep does, in order, with the message it logs: record this worker's heartbeat,
    re-dispatch stale jobs and stale job units (store.units), send due webhooks, delete finished
    jobs past CARCERT_RETENTION_DAYS."""
    from store.retention import delete_expired_jobs
    from worker.webhooks import deliver_due

    return [  # (log message when the step reports n > 0, step)
        ("worker heartbeat: %d", record_beat),
        ("re-dispatched %d stale job(s)", sweep_stale_jobs),
        ("re-dispatched %d stale job unit(s)", sweep_stale_units),
        ("sent %d due webhook(s)", deliver_due),
        ("deleted %d job(s) past retention", delete_expired_jobs),
    ]


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    interval = get_settings().sweep_interval_s
    threading.Thread(target=_sweep_loop, args=(interval,), name="carcert-sweeper", daemon=True).start()


@signals.worker_shutting_down.connect
def _stop_sweeper(**_: Any) -> None:
    SHUTTING_DOWN.set()
    _sweeper_stop.set()
