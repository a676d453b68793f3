"""Fair dispatch across tenants with a real Celery worker and a real database, on Postgres + Redis
and on the embedded SQLite database + SQLite broker alike: tenant A queues a backlog, then tenant
B one job; B's first job starts second (round robin), long before A's backlog drains. Each run has
its own database and queue, so no other test's jobs take part. The jobs are tiny (vanilla, no
training, 2 certified samples)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.spec import JobSpec
from store import jobs as repo
from store.db import init_db, make_engine
from store.models import Job
from tests.integration.service_helpers import launch_worker, wait_for

pytestmark = pytest.mark.integration

TINY = {
    "dataset": "digits",
    "pruning": {
        "method": "vanilla",
        "pretrain_epochs": 0,
        "search_epochs": 0,
        "finetune_epochs": 0,
        "augment_q": 0,
    },
    "certification": {"samples": 2, "n": 5, "l": 2, "t_steps": 10},
    "train_subset": 50,
}
A_JOBS, B_JOBS = 5, 2


@pytest.fixture(params=["postgres+redis", "sqlite"])
def backend(request, fresh_pg_db, redis_url, tmp_path) -> tuple[str, str]:
    """(database URL, broker URL) of a fresh database of the given kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'carcert.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        return
    with fresh_pg_db() as url:
        yield url, redis_url


def test_second_tenant_starts_before_the_first_tenants_backlog_drains(backend, settings_env, tmp_path: Path):
    from celery import Celery

    from store.settings import Settings
    from worker.celery_app import make_celery
    from worker.queue import TASK_NAME

    db_url, broker_url = backend
    engine = make_engine(db_url)
    init_db(engine)
    queue = f"carcert-fair-{uuid.uuid4().hex[:8]}"
    ids: dict[str, list[str]] = {"A": [], "B": []}
    with Session(engine) as s:  # A's backlog first, then B: a FIFO queue would run all of A first
        for tenant, n in (("A", A_JOBS), ("B", B_JOBS)):
            for i in range(n):
                job, _ = repo.create_job(s, f"fair-{tenant}", JobSpec.model_validate({**TINY, "seed": i}))
                s.commit()
                ids[tenant].append(job.id)
    sender: Celery = make_celery(Settings(broker_url=broker_url, database_url=db_url))
    for job_id in ids["A"] + ids["B"]:
        sender.send_task(TASK_NAME, args=[job_id], queue=queue)
    env = {
        **settings_env,
        "CARCERT_DATABASE_URL": db_url,
        "CARCERT_BROKER_URL": broker_url,
        "CARCERT_QUEUE": queue,
        "CARCERT_WORK_ROOT": str(tmp_path / "work"),
        "CARCERT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "CARCERT_QUEUED_STALE_SECONDS": "600",  # only the messages above dispatch
    }
    worker = launch_worker(env, tmp_path / "worker.log", f"carcert-test-fair-{uuid.uuid4().hex[:6]}")
    try:

        def all_done() -> list[Job] | None:
            with Session(engine) as s:
                rows = list(s.scalars(select(Job).where(Job.id.in_(ids["A"] + ids["B"]))))
            return rows if all(j.status in ("succeeded", "failed") for j in rows) else None

        rows = wait_for(all_done, 300, interval=0.5, what="every job to finish")
    except AssertionError:
        raise AssertionError(worker.log()[-4000:]) from None
    finally:
        worker.stop()
        sender.close()
        engine.dispose()
    assert all(j.status == "succeeded" for j in rows), [(j.status, j.error) for j in rows]
    order = [j.tenant[-1] for j in sorted(rows, key=lambda j: j.started_at)]
    # round robin while both tenants wait: A B A B, then the rest of A's backlog
    assert order == ["A", "B", "A", "B", "A", "A", "A"], order
    first_b = min(j.started_at for j in rows if j.tenant == "fair-B")
    last_a = max(j.started_at for j in rows if j.tenant == "fair-A")
    assert first_b < last_a
