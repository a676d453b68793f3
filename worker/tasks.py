"""Celery tasks: run_job(job_id) and the stale-job sweep; dispatch() is what the API calls after the
transaction that created the job has committed."""

from __future__ import annotations

import logging

from celery import Celery

from store.db import session_scope
from store.jobs import stale_jobs
from store.settings import get_settings
from worker.celery_app import app, make_celery

log = logging.getLogger("carcert.worker")

TASK_NAME = "carcert.run_job"


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one job (worker.runner.execute_job): the queued job that is fair across tenants, which is
    `job_id` itself unless another tenant is owed a turn; a job leased by a live worker is skipped."""
    from worker.runner import execute_job

    return execute_job(job_id, fair=True)


_senders: dict[str, Celery] = {}


def _sender() -> Celery:
    """The module app, or (after CARCERT_BROKER_URL changed in this process: tests, `carcert up`)
    a separate app for the current broker URL."""
    url = get_settings().broker_url
    if app.conf.broker_url == url:
        return app
    if url not in _senders:
        _senders[url] = make_celery()
    return _senders[url]


def dispatch(job_id: str, queue: str | None = None) -> bool:
    """Send the run message for `job_id` (to settings.queue unless `queue` is given). Never raises:
    if the broker is unreachable the job stays queued and the workers' stale-job sweep sends it
    later. Returns whether the message went out."""
    try:
        _sender().send_task(
            TASK_NAME,
            args=[job_id],
            queue=queue or get_settings().queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        )
        return True
    except Exception:
        log.exception("could not dispatch job %s; the stale-job sweep will retry", job_id)
        return False


def sweep_stale_jobs() -> int:
    """Re-dispatch queued jobs never picked up and running jobs whose lease expired; returns how many."""
    with session_scope() as s:
        ids = stale_jobs(s)
    for job_id in ids:
        dispatch(job_id)
    return len(ids)
