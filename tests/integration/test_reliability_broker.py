"""The broker loses its messages: a throwaway redis-server (no RDB, no AOF) on a free loopback port
is killed with SIGKILL and restarted, once with every job's message waiting in it and once more
while the workers are connected and running a job. The database stays the source of truth: the
workers' stale-job sweep re-dispatches every queued job, each job runs exactly once (one claim in
all worker logs, attempts == 1: the per-job lease keeps duplicate messages from running it twice)
and none is lost.

The shared Redis and the shared worker are not touched: the jobs live in a database of their own,
served by two workers of their own that listen only to the throwaway Redis."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy.orm import Session

from core.spec import JobSpec
from store import jobs as repo
from store.db import init_db, make_engine
from store.models import Job
from store.settings import Settings
from tests.integration.api_harness import free_port
from tests.integration.service_helpers import wait_for
from worker.queue import TASK_NAME, make_celery

pytestmark = pytest.mark.integration
REQUIRE = os.environ.get("CARCERT_REQUIRE_SERVICES") == "1"  # CI: fail, do not skip

QUEUE = "carcert-reliability-broker"
JOB = {
    "kind": "prune",
    "model": {"arch": "small_cnn"},
    "dataset": "digits",
    "pruning": {
        "method": "lmp",
        "prune_ratio": 0.5,
        "pretrain_epochs": 2,
        "search_epochs": 0,
        "finetune_epochs": 1,
        "augment_q": 20,
        "batch_size": 64,
    },
    "certification": {"n": 10, "l": 2, "samples": 3, "t_steps": 50},
    "train_subset": 200,
}
N_JOBS = 4


class ThrowawayRedis:
    """redis-server --save '' --appendonly no on 127.0.0.1:port; restart() = SIGKILL + start."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            f"redis-server --port {self.port} --bind 127.0.0.1 --appendonly no --daemonize no".split()
            + ["--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 10, interval=0.05, what="redis-server")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    if shutil.which("redis-server") is None:
        (pytest.fail if REQUIRE else pytest.skip)("redis-server not installed")
    r = ThrowawayRedis(free_port())
    yield r
    r.kill()


def rows(url: str, ids: list[str]) -> list[Job]:
    engine = make_engine(url)
    try:
        with Session(engine) as s:
            return [s.get(Job, i) for i in ids]
    finally:
        engine.dispose()


def test_redis_restart_without_persistence_loses_no_job_and_runs_none_twice(
    own_redis, fresh_pg_db, start_worker, tenant
):
    with fresh_pg_db() as db_url:
        engine = make_engine(db_url)
        init_db(engine)
        with Session(engine) as s:
            ids = []
            for seed in range(N_JOBS):
                job, _ = repo.create_job(s, tenant, JobSpec.model_validate({**JOB, "seed": seed}))
                ids.append(job.id)
            s.commit()
        engine.dispose()

        # 1) the messages of every job sit in the broker ... and are lost with it
        sender = make_celery(Settings(broker_url=own_redis.url, database_url=db_url))
        for job_id in ids:
            sender.send_task(TASK_NAME, args=[job_id], queue=QUEUE)
        assert own_redis.client().llen(QUEUE) == N_JOBS
        own_redis.restart()
        assert own_redis.client().dbsize() == 0  # no persistence: every message is gone
        sender.pool.force_close_all()

        # 2) two workers on the restarted broker: their sweep finds the queued jobs in the database
        env = {
            "CARCERT_DATABASE_URL": db_url,
            "CARCERT_BROKER_URL": own_redis.url,
            "CARCERT_QUEUE": QUEUE,
            "CARCERT_QUEUED_STALE_SECONDS": "3",
            "CARCERT_SWEEP_INTERVAL_S": "1",
        }
        workers = []
        starters = [
            threading.Thread(target=lambda n=n: workers.append(start_worker(f"broker-{n}", **env)))
            for n in range(2)
        ]
        for t in starters:
            t.start()
        for t in starters:
            t.join(120)
        assert len(workers) == 2

        # 3) the broker dies again while a job runs: the duplicates the sweep sent are lost too
        wait_for(lambda: any(j.status == "running" for j in rows(db_url, ids)), 120, what="a running job")
        own_redis.restart()

        def all_final() -> bool:
            return all(j.status in ("succeeded", "failed", "cancelled") for j in rows(db_url, ids))

        try:
            wait_for(all_final, 240, interval=0.5, what="every job to finish")
        except AssertionError:
            raise AssertionError("\n\n".join(w.log()[-3000:] for w in workers)) from None

        logs = "\n".join(w.log() for w in workers)
        for job in rows(db_url, ids):
            assert job.status == "succeeded", (job.id, job.error)
            assert job.attempts == 1 and job.lease_owner is None, job.id
            claims = re.findall(rf"job {job.id} claimed by (\S+)", logs)
            assert len(claims) == 1, (job.id, claims)  # run once, by one worker
        assert re.search(r"re-dispatched \d+ stale job", logs)
        assert "Connection to broker lost" in logs  # the second restart hit connected workers
        for w in workers:
            w.stop()
        time.sleep(0.2)
