"""The database goes away and comes back. A TCP proxy written here (threads + sockets, loopback
only) sits between the service and the shared Postgres; cut() drops every open connection and
refuses new ones, restore() listens again on the same port. The shared Postgres itself is never
stopped.

- the API (uvicorn subprocess) answers 503 problem+json with Retry-After while the database is
  cut, writes nothing, and answers 200 / 202 again once it is back (pool_pre_ping reconnects);
- a real Celery worker whose database is cut in the middle of a job keeps running, its progress
  and lease writes fail and are retried, and the job succeeds on its first attempt."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core.spec import JobSpec
from store import jobs as repo
from store.db import init_db, make_engine
from store.models import Job
from tests.integration.api_harness import assert_problem, create_key, free_port, run_server, server_env
from tests.integration.service_helpers import launch_worker, wait_for
from worker.queue import dispatch

pytestmark = pytest.mark.integration


class TcpProxy:
    """Forwards 127.0.0.1:<port> to (host, port) of the upstream; cut() / restore()."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.accepted = 0
        self.restore()

    def restore(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (what a crashed server looks like)."""
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not lst:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._socks += [client, server]
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def proxied(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def upstream_of(url: str) -> tuple[str, int]:
    u = make_url(url)
    return (u.host or "127.0.0.1", u.port or 5432)


def n_jobs(db_url: str) -> int:
    engine = create_engine(db_url)
    with engine.connect() as c:
        n = c.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    return int(n)


TINY = {
    "dataset": "digits",
    "pruning": {"method": "lmp", "pretrain_epochs": 1, "search_epochs": 0, "finetune_epochs": 0},
    "certification": {"samples": 2, "n": 10, "l": 2},
}


@pytest.fixture
def proxied_db(fresh_pg_db) -> Iterator[tuple[str, str, TcpProxy]]:
    """(direct url, url through the proxy, proxy) of a fresh migrated database."""
    with fresh_pg_db() as url:
        engine = make_engine(url)
        init_db(engine)
        engine.dispose()
        proxy = TcpProxy(upstream_of(url))
        try:
            yield url, proxied(url, proxy), proxy
        finally:
            proxy.cut()


def test_api_answers_503_while_the_database_is_down_and_recovers(proxied_db, tmp_path):
    direct, via_proxy, proxy = proxied_db
    key = create_key(direct, "alice")
    env = server_env(via_proxy, tmp_path, CARCERT_BROKER_URL="redis://127.0.0.1:6379/14")
    with run_server(env, tmp_path / "server.log") as srv, srv.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        assert c.get("/jobs").status_code == 200
        first = c.post("/jobs", json=TINY)
        assert first.status_code == 202, first.text
        assert c.get("/readyz").status_code == 200

        proxy.cut()
        t0 = time.monotonic()
        for r in (
            c.get("/jobs"),
            c.get(f"/jobs/{first.json()['id']}"),
            c.post("/jobs", json={**TINY, "seed": 1}),
            c.post(f"/jobs/{first.json()['id']}/cancel"),
        ):
            body = assert_problem(r, 503)
            assert "database" in body["detail"].lower()
            assert int(r.headers["retry-after"]) > 0
            assert str(proxy.port) not in r.text and "psycopg" not in r.text
        # an upload during the outage: 503 and no blob left behind (nor a temporary file)
        blobs = sorted(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
        r = c.post("/artifacts", files={"file": ("w.safetensors", st_save({"w": torch.ones(3)}))})
        assert "database" in assert_problem(r, 503)["detail"].lower()
        assert sorted(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()) == blobs
        assert time.monotonic() - t0 < 20  # answered, not hung
        assert c.get("/healthz").status_code == 200  # liveness does not need the database
        assert assert_problem(c.get("/readyz"), 503)["checks"]["database"] == "unreachable"
        assert n_jobs(direct) == 1  # the refused POST wrote nothing

        proxy.restore()
        r = wait_for(lambda: (r := c.get("/jobs")).status_code == 200 and r, 20, what="the API to recover")
        assert [j["id"] for j in r.json()["items"]] == [first.json()["id"]]
        again = c.post("/jobs", json={**TINY, "seed": 1})
        assert again.status_code == 202, again.text
        assert c.get("/readyz").status_code == 200
        assert n_jobs(direct) == 2


@pytest.fixture(scope="module")
def outage_worker(settings_env, fresh_pg_db, tmp_path_factory):
    """A real worker (own queue) whose database (fresh, migrated) goes through a TCP proxy:
    (direct engine, proxy, worker, queue)."""
    with fresh_pg_db() as url:
        engine = make_engine(url)
        init_db(engine)
        proxy = TcpProxy(upstream_of(url))
        queue = f"carcert-reliability-db-{uuid.uuid4().hex[:8]}"
        env = {
            **settings_env,
            "CARCERT_DATABASE_URL": proxied(url, proxy),
            "CARCERT_QUEUE": queue,
            "CARCERT_LEASE_SECONDS": "9",
            "CARCERT_SWEEP_INTERVAL_S": "1",
        }
        worker = launch_worker(
            env, tmp_path_factory.mktemp("outage") / "worker.log", "carcert-test-db-outage"
        )
        try:
            yield engine, proxy, worker, queue
        finally:
            if proxy._listener is None:
                proxy.restore()  # let the worker stop cleanly
            worker.stop()
            proxy.cut()
            engine.dispose()


def submit(engine, tenant: str, spec: dict, queue: str) -> Callable[[], Job]:
    with Session(engine) as s:
        job, _ = repo.create_job(s, tenant, JobSpec.model_validate(spec))
        s.commit()
        job_id = job.id

    def row() -> Job:
        with Session(engine) as s:
            return s.get(Job, job_id)

    assert dispatch(job_id, queue=queue)
    return row


def final(row: Callable[[], Job], timeout: float = 240) -> Job:
    return wait_for(
        lambda: (j := row()).status in ("succeeded", "failed", "cancelled") and j, timeout, what="job"
    )


def test_worker_retries_its_writes_through_a_database_outage(outage_worker, tenant):
    engine, proxy, worker, queue = outage_worker
    spec = {
        **TINY,
        # long enough that the 4 s outage falls inside the pretraining on a quiet machine too (8
        # epochs could end within the outage there, and the final save then met the outage instead)
        "pruning": {**TINY["pruning"], "pretrain_epochs": 400, "batch_size": 32},
        "train_subset": 300,
        "model": {"arch": "small_cnn"},
    }
    row = submit(engine, tenant, spec, queue)
    job_id = row().id
    wait_for(lambda: row().stage == "pretrain" and row().progress > 0, 120, interval=0.1, what="pretrain")
    proxy.cut()
    cut_at = row().progress
    time.sleep(4)  # several progress writes and one lease renewal fall into the outage
    assert row().progress == cut_at  # nothing got through
    proxy.restore()
    wait_for(lambda: row().progress > cut_at, 60, interval=0.1, what="progress after the outage")
    assert row().stage == "pretrain"  # the outage fell inside the run, not at its final save
    done = final(row)
    log = worker.log()
    assert done.status == "succeeded", (done.error, log[-3000:])
    assert done.attempts == 1  # the same run went on: no restart, no second claim
    assert log.count(f"job {job_id} claimed by") == 1
    assert "progress update failed" in log or "lease renewal failed" in log


def test_results_lost_to_an_outage_at_the_end_are_saved_by_the_next_attempt(
    outage_worker, tenant, service_dirs
):
    """The database is cut during the certification and stays down while the worker tries to save
    the results: that attempt dies (nothing half-written: blobs removed, one transaction), its
    work folder stays, and after the outage the expired lease sends the job round again; attempt
    2 finds the finished variant on disk and only saves it."""
    engine, proxy, worker, queue = outage_worker
    spec = {
        **TINY,
        "certification": {"samples": 200, "n": 50, "l": 2},
        "train_subset": 300,
        "model": {"arch": "small_cnn"},
    }
    row = submit(engine, tenant, spec, queue)
    job_id = row().id
    wait_for(lambda: row().stage == "certify", 120, interval=0.03, what="the certification")
    proxy.cut()
    out = service_dirs["work"] / job_id / "out"
    wait_for(lambda: list(out.glob("*/certificate.json")), 120, interval=0.05, what="the finished variant")
    wait_for(
        lambda: "Traceback" in worker.log().split(f"job {job_id} claimed by", 1)[1],
        30,
        what="the failed save",
    )
    time.sleep(1)
    assert row().status == "running" and row().attempts == 1  # the row could not be touched
    assert out.is_dir()  # the work is kept for the next attempt
    proxy.restore()
    done = final(row)
    assert done.status == "succeeded", (done.error, worker.log()[-3000:])
    assert done.attempts == 2
    with Session(engine) as s:
        (res,) = repo.get_results(s, job_id)
        assert res.certificate["job_id"] == job_id and len(res.certificate["samples"]) == 200
        n_arts = s.execute(
            text("SELECT count(*) FROM artifacts WHERE filename LIKE :p"), {"p": f"{job_id}-%"}
        ).scalar_one()
    assert n_arts == 4  # model, mask, evidence, examples: none left over from the failed attempt
    # the worker removes the work folder just after committing the final status (then logs)
    wait_for(lambda: not (service_dirs["work"] / job_id).exists(), 30, what="the work folder removed")
