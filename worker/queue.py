"""The job queue as the API and the runner see it: building a Celery app for the configured broker
(make_celery), sending a job's run message (dispatch) and re-sending stale jobs (sweep_stale_jobs).

Imports nothing else from worker/, so worker.celery_app (the worker process), worker.runner and
the API all import it without a circle; sending needs only the task name, not the task module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from store.db import session_scope
from store.jobs import stale_jobs
from store.settings import Settings, get_settings
from store.units import stale_units

log = logging.getLogger("carcert.worker")

TASK_NAME = "carcert.run_job"
UNIT_TASK_NAME = "carcert.run_unit"  # one unit of a job spread over workers (worker.fanout)


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


_senders: dict[str, Celery] = {}


def adopt(app: Celery) -> None:
    """Send through `app` (the worker process's own app) for its broker URL."""
    _senders.setdefault(app.conf.broker_url, app)


def sender() -> Celery:
    """The Celery app for the current broker URL (settings.broker_url; it changes within one process
    in the tests and under `carcert up`), made once per URL."""
    url = get_settings().broker_url
    if url not in _senders:
        _senders[url] = make_celery()
    return _senders[url]


def dispatch(job_id: str, queue: str | None = None, task: str = TASK_NAME) -> bool:
    """Send the run message for `job_id` (to settings.queue unless `queue` is given). Never raises:
    if the broker is unreachable the job stays queued and the workers' stale-job sweep sends it
    later. Returns whether the message went out."""
    try:
        sender().send_task(
            task,
            args=[job_id],
            queue=queue or get_settings().queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        )
        return True
    except Exception:
        log.exception("could not dispatch job %s; the stale-job sweep will retry", job_id)
        return False


def dispatch_unit(unit_id: str, queue: str | None = None) -> bool:
    """Send the run message of a job unit (store.units) to `queue` (the unit's own; None:
    settings.queue); never raises (the stale sweep resends)."""
    return dispatch(unit_id, queue=queue, task=UNIT_TASK_NAME)


def sweep_stale_units() -> int:
    """Re-dispatch units never picked up and running units whose lease expired, each to its own
    queue; returns how many."""
    with session_scope() as s:
        units = stale_units(s)
    for unit_id, queue in units:
        dispatch_unit(unit_id, queue)
    return len(units)


def sweep_stale_jobs() -> int:
    """Re-dispatch queued jobs never picked up and running jobs whose lease expired; returns how many."""
    with session_scope() as s:
        ids = stale_jobs(s)
    for job_id in ids:
        dispatch(job_id)
    return len(ids)
