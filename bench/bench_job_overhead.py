"""Job overhead: a tiny job through HTTP + Celery vs the same pipeline called directly.

Target (issue): end-to-end <= 1.1 x direct, and queue latency < 200 ms.

direct   `core.pipeline.run_job(spec, tmp/out, LocalContext(tmp))` in this process (torch threads
         `--threads`), wall time per call.
service  the same JobSpec through the real service: `uvicorn --factory api.main:create_app` (one
         process) and a real Celery worker (`carcert.cli_service.worker_command`, solo pool, torch
         threads `--threads` via OMP_NUM_THREADS), on
           postgres  a fresh Postgres database (Alembic head; dropped at the end) + Redis (an empty
                     database number, a private queue name)
           embedded  the `carcert up` defaults: SQLite + kombu's SQLAlchemy transport on SQLite
         The client POSTs /jobs and polls GET /jobs/{id} every `--poll` s until the job is final.
         Per job: e2e = POST -> "succeeded" seen by the client (wall); queue latency = started_at -
         created_at (database timestamps: insert -> claimed by the worker); server e2e =
         finished_at - created_at; pipeline = summary["seconds"] (run_job's own wall time inside
         the worker); worker overhead = (finished_at - started_at) - pipeline.
         CPU seconds per job of the worker and API processes come from /proc/<pid>/stat.

Worker and API start-up (import torch, ...) are excluded: one warm-up job per backend and one
direct warm-up call are run and discarded; everything per job is included. Direct calls and
service jobs alternate (direct, job, direct, job, ...) so background load hits both alike.

    .venv/bin/python -m bench.bench_job_overhead --jobs 7 --threads 1 [--backends postgres,embedded]
        [--poll 0.02] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("CARCERT_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("CARCERT_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
TENANT = "bench"

# the tiny job: small_cnn on 500 digits (8x8), CAR at 50 %, 2 epochs per stage (--epochs, --train-subset),
# CC-Cert n=20, l=5 on 20 test samples
TINY_SPEC: dict[str, Any] = {
    "kind": "prune",
    "model": {"arch": "small_cnn"},
    "dataset": "digits",
    "transform": {"kind": "parametric", "name": "illumination"},
    "pruning": {
        "method": "car",
        "prune_ratio": 0.5,
        "pretrain_epochs": 2,
        "search_epochs": 2,
        "finetune_epochs": 2,
        "augment_q": 100,
        "batch_size": 64,
    },
    "certification": {"n": 20, "l": 5, "samples": 20},
    "train_subset": 500,
    "seed": 0,
}
FINAL = ("succeeded", "failed", "cancelled")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ helpers


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    p90 = v[min(len(v) - 1, max(0, round(0.9 * (len(v) - 1))))]
    return {"median": statistics.median(v), "p90": p90, "min": v[0], "max": v[-1]}


def parse_ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def postgres_db() -> contextlib.AbstractContextManager[str]:
    """A fresh Postgres database migrated to head; dropped afterwards."""
    from store.db import scratch_database

    return scratch_database(PG_URL, "carcert_bench_oh")


@contextlib.contextmanager
def redis_db() -> Iterator[str]:
    """redis://.../<n> on a database number nobody uses (claimed with a marker key), flushed afterwards."""
    import redis

    r0 = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=2)
    n_db = int(r0.config_get("databases").get("databases", 16))
    marker = f"carcert-bench-{uuid.uuid4().hex}"
    for n in range(n_db - 1, 0, -1):
        r = redis.Redis.from_url(f"{REDIS_BASE}/{n}")
        if r.dbsize() == 0 and r.set("carcert:bench:owner", marker, nx=True):
            url = f"{REDIS_BASE}/{n}"
            try:
                yield url
            finally:
                r.flushdb()
            return
    raise RuntimeError("no empty Redis database number")


def make_key(db_url: str) -> str:
    from sqlalchemy.orm import Session

    from store.db import make_engine
    from store.keys import create_api_key

    engine = make_engine(db_url)
    with Session(engine) as s:
        key = create_api_key(s, TENANT, "bench")
        s.commit()
    engine.dispose()
    return key


@contextlib.contextmanager
def service(env: dict[str, str], tmp: Path, threads: int) -> Iterator[tuple[str, int, int]]:
    """uvicorn (one process) + Celery worker (solo pool); yields (base url, api pid, worker pid)."""
    from carcert.cli_service import api_command, free_port, worker_command
    from carcert.supervisor import stop_process

    full = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    full.update(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    wcmd = worker_command(pool="solo", concurrency=1, loglevel="info", queue=env["CARCERT_QUEUE"])
    wcmd[wcmd.index("--hostname") + 1] = f"bench-{uuid.uuid4().hex[:6]}@%h"
    port = free_port()
    acmd = api_command(port, "127.0.0.1", "--no-access-log")
    wlog, alog = tmp / "worker.log", tmp / "api.log"
    with open(wlog, "wb") as wf, open(alog, "wb") as af:
        worker = subprocess.Popen(wcmd, cwd=str(ROOT), env=full, stdout=wf, stderr=subprocess.STDOUT)
        api = subprocess.Popen(acmd, cwd=str(ROOT), env=full, stdout=af, stderr=subprocess.STDOUT)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            for name, p, log in (("worker", worker, wlog), ("api", api, alog)):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{log.read_text(errors='replace')[-3000:]}")
            ok = False
            if " ready." in wlog.read_text(errors="replace"):
                with contextlib.suppress(httpx.TransportError):
                    ok = httpx.get(url + "/healthz", timeout=1).status_code == 200
            if ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("service did not start:\n" + wlog.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield url, api.pid, worker.pid
    except BaseException:
        for log in (alog, wlog):
            print(f"--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        stop_process(api, 10)
        stop_process(worker, 30)


# ------------------------------------------------------------------------------------------ runs


def run_direct(spec: Any, tmp: Path) -> dict[str, float]:
    from core.context import LocalContext
    from core.pipeline import run_job

    d = Path(tempfile.mkdtemp(dir=tmp))
    c0, t0 = time.process_time(), time.perf_counter()
    summary = run_job(spec, d / "out", LocalContext(d))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(d, ignore_errors=True)
    assert summary["variants"], summary
    return {"wall": wall, "cpu": cpu}


POLLER = """
import sys, time, httpx
url, key, job_id, poll = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with httpx.Client(base_url=url, headers={"Authorization": "Bearer " + key}) as c:
    c.get("/jobs/" + job_id).raise_for_status()
    print("polling", flush=True)
    while True:
        c.get("/jobs/" + job_id)
        time.sleep(poll)
"""


def run_direct_polled(spec: Any, tmp: Path, url: str, key: str, job_id: str, poll: float) -> dict[str, float]:
    """Control: the direct call while a client process polls GET /jobs/{id} (of a finished job) at
    the same interval, i.e. the CPU that the client + API + database spend on polling is taken
    from the pipeline here as well."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, url, key, job_id, str(poll)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert poller.stdout is not None and poller.stdout.readline().strip() == "polling"
        return run_direct(spec, tmp)
    finally:
        poller.terminate()
        poller.wait(10)


def run_service_job(client: Any, poll: float, api_pid: int, worker_pid: int) -> dict[str, float]:
    cw0, ca0 = cpu_seconds(worker_pid), cpu_seconds(api_pid)
    t0 = time.perf_counter()
    r = client.post("/jobs", json=TINY_SPEC)
    t_post = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    polls = 0
    while True:
        time.sleep(poll)
        body = client.get(f"/jobs/{job_id}").json()
        polls += 1
        if body["status"] in FINAL:
            break
    e2e = time.perf_counter() - t0
    cw, ca = cpu_seconds(worker_pid) - cw0, cpu_seconds(api_pid) - ca0
    if body["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {body['status']}: {body.get('error')}")
    created, started, finished = (parse_ts(body[k]) for k in ("created_at", "started_at", "finished_at"))
    pipeline = float(body["summary"]["seconds"])
    return {
        "job_id": job_id,
        "e2e": e2e,
        "post": t_post,
        "queue": started - created,
        "server_e2e": finished - created,
        "pipeline": pipeline,
        "worker_overhead": finished - started - pipeline,
        "worker_cpu": cw,
        "api_cpu": ca,
        "polls": polls,
    }


def bench_backend(backend: str, args: argparse.Namespace, spec: Any, tmp: Path) -> dict[str, Any]:
    import httpx

    with contextlib.ExitStack() as stack:
        base = tmp / backend
        base.mkdir()
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        if backend == "postgres":
            db_url = stack.enter_context(postgres_db())
            broker = stack.enter_context(redis_db())
        else:
            from store.db import init_db, make_engine

            db_url, broker = f"sqlite:///{base / 'carcert.db'}", f"sqla+sqlite:///{base / 'broker.db'}"
            engine = make_engine(db_url)
            init_db(engine)
            engine.dispose()
        env = {
            "CARCERT_DATABASE_URL": db_url,
            "CARCERT_BROKER_URL": broker,
            "CARCERT_QUEUE": queue,
            "CARCERT_ARTIFACT_BACKEND": "local",
            "CARCERT_ARTIFACT_ROOT": str(base / "artifacts"),
            "CARCERT_WORK_ROOT": str(base / "work"),
            "CARCERT_DATA_ROOTS": json.dumps([str(base / "data")]),
        }
        key = make_key(db_url)
        url, api_pid, worker_pid = stack.enter_context(service(env, base, args.threads))
        client = stack.enter_context(
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        )
        print(f"[{backend}] warm-up", flush=True)
        warm = run_service_job(client, args.poll, api_pid, worker_pid)
        time.sleep(0.5)
        c0, t0 = cpu_seconds(worker_pid), time.perf_counter()
        time.sleep(args.idle)  # what an idle worker costs (broker polling, heartbeat, sweep)
        idle_cpu = (cpu_seconds(worker_pid) - c0) / (time.perf_counter() - t0)
        direct, polled, jobs = [], [], []
        for i in range(args.jobs):
            d = run_direct(spec, tmp)
            j = run_service_job(client, args.poll, api_pid, worker_pid)
            direct.append(d)
            jobs.append(j)
            if args.control:
                polled.append(run_direct_polled(spec, tmp, url, key, str(warm["job_id"]), args.poll))
            print(
                f"[{backend}] {i}: direct {d['wall']:.3f}s  e2e {j['e2e']:.3f}s"
                f"  queue {j['queue'] * 1e3:.0f}ms  pipeline {j['pipeline']:.3f}s"
                f"  worker overhead {j['worker_overhead'] * 1e3:.0f}ms"
                f"  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    dw = [d["wall"] for d in direct]
    out: dict[str, Any] = {
        "direct_wall": stats(dw),
        "direct_cpu": stats([d["cpu"] for d in direct]),
        **{k: stats([j[k] for j in jobs]) for k in jobs[0] if k != "job_id"},
        "ratio_e2e_direct": statistics.median([j["e2e"] for j in jobs]) / statistics.median(dw),
        "ratio_pairwise": stats([j["e2e"] / d["wall"] for j, d in zip(jobs, direct, strict=True)]),
        "ratio_cpu": statistics.median([j["worker_cpu"] + j["api_cpu"] for j in jobs])
        / statistics.median([d["cpu"] for d in direct]),
        "ratio_cpu_worker": statistics.median([j["worker_cpu"] for j in jobs])
        / statistics.median([d["cpu"] for d in direct]),
        "idle_worker_cpu": idle_cpu,
        "raw": {"direct": direct, "jobs": jobs, "direct_polled": polled},
    }
    if polled:
        out["direct_polled_wall"] = stats([d["wall"] for d in polled])
        out["ratio_e2e_direct_polled"] = statistics.median([j["e2e"] for j in jobs]) / statistics.median(
            [d["wall"] for d in polled]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=7, help="measured jobs (and direct calls) per backend")
    p.add_argument("--threads", type=int, default=1, help="torch threads, direct and in the worker")
    p.add_argument("--backends", default="postgres,embedded")
    p.add_argument("--poll", type=float, default=0.02, help="client polling interval of GET /jobs/{id} (s)")
    p.add_argument("--epochs", type=int, default=2, help="pretrain = search = finetune epochs")
    p.add_argument("--train-subset", type=int, default=500)
    p.add_argument("--idle", type=float, default=3.0, help="seconds to measure the idle worker's CPU")
    p.add_argument(
        "--control",
        action="store_true",
        help="also time the direct call while a client process polls the API at --poll",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from core.spec import JobSpec

    TINY_SPEC["train_subset"] = args.train_subset
    TINY_SPEC["pruning"].update(
        pretrain_epochs=args.epochs, search_epochs=args.epochs, finetune_epochs=args.epochs
    )
    spec = JobSpec.model_validate(TINY_SPEC)
    load0 = os.getloadavg()
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "spec": TINY_SPEC,
    }
    with tempfile.TemporaryDirectory(prefix="carcert-bench-oh-") as tmp_s:
        tmp = Path(tmp_s)
        print("direct warm-up", flush=True)
        run_direct(spec, tmp)
        for backend in args.backends.split(","):
            results[backend] = bench_backend(backend, args, spec, tmp)
    results["loadavg"] = {"start": load0, "end": os.getloadavg()}

    print(f"\n{results['machine']}; load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    hdr = (
        "| backend | direct s | e2e s (client) | ratio e2e/direct | pairwise | server e2e s | ratio server | "
        "queue ms | pipeline in worker s | worker overhead ms | CPU ratio worker / +API | idle worker CPU "
        "| polls |"
    )
    print(hdr)
    print("|" + "---|" * hdr.count(" | ") + "---|")
    for b in args.backends.split(","):
        r = results[b]

        def mp(k: str, scale: float = 1.0, fmt: str = "{:.3f}", r: dict = r) -> str:
            return f"{fmt.format(r[k]['median'] * scale)} / {fmt.format(r[k]['p90'] * scale)}"

        server_ratio = r["server_e2e"]["median"] / r["direct_wall"]["median"]
        print(
            f"| {b} | {mp('direct_wall')} | {mp('e2e')} | **{r['ratio_e2e_direct']:.3f}** | "
            f"{r['ratio_pairwise']['median']:.3f} | {mp('server_e2e')} | {server_ratio:.3f} | "
            f"**{mp('queue', 1e3, '{:.0f}')}** | {mp('pipeline')} | {mp('worker_overhead', 1e3, '{:.0f}')} | "
            f"{r['ratio_cpu_worker']:.3f} / {r['ratio_cpu']:.3f} | {r['idle_worker_cpu'] * 100:.1f}% | "
            f"{r['polls']['median']:.0f} |"
        )
    for b in args.backends.split(","):
        r = results[b]
        if "direct_polled_wall" in r:
            dp = r["direct_polled_wall"]
            print(
                f"{b}: direct while a client polls every {args.poll} s:"
                f" {dp['median']:.3f} / {dp['p90']:.3f} s;"
                f" e2e / that = {r['ratio_e2e_direct_polled']:.3f}"
            )
    print("(median / p90)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
