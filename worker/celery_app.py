"""Celery application, configured from store.settings.

Delivery guarantees: acks_late + task_reject_on_worker_lost + prefetch 1 (a message is acked only
after the task ran; a worker killed mid-task gives its message back), JSON only. Because some
brokers still lose messages (kombu's SQLAlchemy transport on kill -9, a Redis restart), the
database stays the source of truth: each worker re-dispatches stale jobs at start and every
settings.sweep_interval_s seconds (worker.tasks.sweep_stale_jobs), and claim_job makes sure a job
runs at most once at a time.

Run: `celery -A worker.celery_app worker` (or `carcert worker`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals

from store.settings import Settings, get_settings

log = logging.getLogger("carcert.worker")
QUEUE = "carcert"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("carcert", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, Any] = {}
    if settings.broker_url.startswith("sqla+sqlite"):
        transport_options = {
            "connect_args": {"timeout": 30, "check_same_thread": False},
        }
        path = settings.broker_url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        # redelivery of unacked messages; longer than any job so a running job is not re-sent
        transport_options = {"visibility_timeout": settings.job_time_limit_s + 3600}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 120,
        task_default_queue=settings.queue,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    app.steps["consumer"].add(BrokerPollInterval)
    return app


class BrokerPollInterval(bootsteps.StartStopStep):
    """A database broker (kombu's SQLAlchemy transport, the embedded default) has no push: an idle
    worker polls the queue table every Transport.polling_interval seconds, 1 s by default, which
    made the embedded queue latency ~0.5 s. It cannot be set through broker_transport_options
    (the SQLAlchemy transport passes those to create_engine), so this consumer step sets it on the
    consumer's connection (again after every reconnect) to settings.broker_poll_interval_s."""

    requires = {"celery.worker.consumer.connection:Connection"}

    def start(self, c: Any) -> None:
        transport = getattr(c.connection, "transport", None)
        if type(transport).__module__.startswith("kombu.transport.sqlalchemy"):
            transport.polling_interval = get_settings().broker_poll_interval_s


app = make_celery()


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


_MAIN_RUNS_TASKS = False


@signals.worker_init.connect
def _pin_main(sender: Any = None, **_: Any) -> None:
    """solo / threads pools run tasks in the main process: pin it by settings.worker_index."""
    global _MAIN_RUNS_TASKS
    pool = str(getattr(sender, "pool_cls", "")).lower()
    if "prefork" not in pool and "processes" not in pool:
        _MAIN_RUNS_TASKS = True
        gpu = pin_gpu(get_settings().worker_index)
        log.info("worker %s pinned to GPU %s", os.getpid(), gpu)


# --- stale-job sweep (no beat needed) ---------------------------------------------------------------

_sweeper_stop = threading.Event()


def _sweep_loop(interval: float) -> None:
    from worker.tasks import sweep_stale_jobs

    if _MAIN_RUNS_TASKS:  # solo / threads: load torch and core now, not when the first job arrives
        try:
            import worker.runner  # noqa: F401
        except Exception:
            log.exception("cannot import the job runner")

    while True:
        try:
            n = sweep_stale_jobs()
            if n:
                log.warning("re-dispatched %d stale job(s)", n)
        except Exception:  # the sweep must never kill the worker
            log.exception("stale-job sweep failed")
        if interval <= 0 or _sweeper_stop.wait(interval):
            return


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    interval = get_settings().sweep_interval_s
    threading.Thread(target=_sweep_loop, args=(interval,), name="carcert-sweeper", daemon=True).start()


@signals.worker_shutting_down.connect
def _stop_sweeper(**_: Any) -> None:
    from worker.shutdown import SHUTTING_DOWN

    SHUTTING_DOWN.set()
    _sweeper_stop.set()
