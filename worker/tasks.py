"""The Celery task the workers run: carcert.run_job(job_id). Sending it (dispatch) and the
stale-job sweep live in worker.queue, which the API and the runner import without this module."""

from __future__ import annotations

from worker.celery_app import app
from worker.queue import TASK_NAME, UNIT_TASK_NAME


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one job (worker.runner.execute_job): the queued job that is fair across tenants, which is
    `job_id` itself unless another tenant is owed a turn; a job leased by a live worker is skipped."""
    from worker.runner import execute_job  # torch and core load with the first job, not at import

    return execute_job(job_id, fair=True)


@app.task(name=UNIT_TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_unit(unit_id: str) -> str:
    """Run one unit (a variant) of a job spread over workers (worker.units.execute_unit)."""
    from worker.units import execute_unit

    return execute_unit(unit_id)
