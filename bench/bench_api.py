"""Load test of GET /jobs/{id}/certificate (target: >= 1500 req/s, p99 < 50 ms, one API process).

Set-up: a fresh database (a temporary Postgres database when one is reachable, else SQLite) with
one tenant, its API key and a succeeded job whose result holds a DESIGN.md certificate of
`--samples` samples; then `uvicorn --factory api.main:create_app` with ONE worker process
(uvloop + httptools when installed) on a free loopback port.

Load: a closed-loop generator on raw asyncio sockets (HTTP/1.1 keep-alive, `--connections`
concurrent connections), for `--duration` seconds after `--warmup` seconds, at most `--max-requests`
requests; every response must be 200 with the full body. Reports req/s and latency percentiles
(ms); optionally the same with `wrk` (`--wrk`) when it is installed.

    .venv/bin/python -m bench.bench_api --duration 10 --connections 16 [--wrk] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from carcert.cli_service import api_command, free_port

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("CARCERT_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def certificate(samples: int, seed: int = 0) -> dict:
    """A certificate with the DESIGN.md layout and `samples` per-sample entries."""
    rng = random.Random(seed)
    rows = []
    for i in range(samples):
        d = rng.uniform(0, 5)
        rows.append(
            {
                "index": i,
                "label": rng.randrange(10),
                "pred": rng.randrange(10),
                "d": d,
                "max_z": rng.uniform(0, 3),
                "epsilon_bound": rng.uniform(0, 1e-2),
                "t_star": rng.uniform(1e-4, 1e4),
                "certified": rng.random() < 0.8,
            }
        )
    return {
        "job_id": None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "software": {"carcert": "0.1.0", "torch": "2.14.1"},
        "model": {
            "arch": "resnet18",
            "sha256": "0" * 64,
            "params": 11_000_000,
            "nonzero": 5_500_000,
            "sparsity": 0.5,
            "layers": [{"name": f"layer{i}.weight", "sparsity": 0.5} for i in range(21)],
        },
        "mask_sha256": "1" * 64,
        "dataset": {"ref": "fashion-mnist", "sha256": "2" * 64},
        "transform": {"kind": "parametric", "name": "illumination", "strength": 1.0},
        "params": {
            "n": 100,
            "l": 10,
            "alpha": 0.9,
            "epsilon": 1e-3,
            "t_min": 1e-4,
            "t_max": 1e4,
            "t_steps": 500,
            "seed": 0,
            "samples": samples,
        },
        "failure_probability": 1e-5,
        "accuracy": 0.91,
        "pca": 0.8,
        "samples": rows,
    }


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh Postgres database (dropped afterwards), or a temporary SQLite file."""
    try:
        import psycopg

        psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    from store.db import scratch_database

    with scratch_database(PG_URL, "carcert_bench", migrate=False) as url:  # seed_job migrates
        yield url


def seed_job(db_url: str, samples: int) -> tuple[str, str]:
    """Migrate, create a key and a succeeded job with one certified result; (key, job_id)."""
    from sqlalchemy.orm import sessionmaker

    from core.results import VariantResult
    from core.spec import JobSpec
    from store.db import init_db, make_engine, session_scope
    from store.jobs import add_result, create_job, finish_job
    from store.keys import create_api_key

    engine = make_engine(db_url)
    init_db(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with session_scope(factory) as s:
        key = create_api_key(s, "bench", "bench")
        job, _ = create_job(s, "bench", JobSpec())
        cert = certificate(samples)
        cert["job_id"] = job.id
        result = VariantResult(
            name="car-0.50", method="car", prune_ratio=0.5, accuracy=0.91, pca=0.8, sparsity=0.5
        )
        add_result(s, job.id, result, certificate=cert)
        finish_job(s, job.id, "succeeded", summary={"variants": [{"name": "car-0.50"}]})
        job_id = job.id
    engine.dispose()
    return key, job_id


@contextlib.contextmanager
def server(db_url: str, tmp: Path) -> Iterator[tuple[str, int, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARCERT_")}
    env.update(
        CARCERT_DATABASE_URL=db_url,
        CARCERT_BROKER_URL="redis://127.0.0.1:6379/15",
        CARCERT_ARTIFACT_ROOT=str(tmp / "artifacts"),
        CARCERT_WORK_ROOT=str(tmp / "work"),
        PYTHONPATH=str(ROOT),
    )
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    cmd = api_command(port, "127.0.0.1", "--loop", loop, "--http", http, "--no-access-log")
    log = open(tmp / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "server.log").read_text())
            time.sleep(0.1)
        yield "127.0.0.1", port, f"{loop}+{http}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    return status, len(body)


async def _worker(
    host: str,
    port: int,
    request: bytes,
    stop_at: float,
    warm_until: float,
    lat: list[float],
    errors: list[str],
    budget: list[int],
    expect_len: int,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while budget[0] > 0:
            now = time.perf_counter()
            if now >= stop_at:
                break
            writer.write(request)
            status, n = await _read_response(reader)
            end = time.perf_counter()
            if status != 200 or n != expect_len:
                errors.append(f"status {status}, {n} bytes")
            if now >= warm_until:
                lat.append(end - now)
                budget[0] -= 1
    finally:
        writer.close()


async def load(
    host: str,
    port: int,
    path: str,
    key: str,
    *,
    connections: int,
    duration: float,
    warmup: float,
    max_requests: int,
    expect_len: int,
) -> dict:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()
    lat: list[float] = []
    errors: list[str] = []
    budget = [max_requests]
    t0 = time.perf_counter()
    warm_until = t0 + warmup
    stop_at = warm_until + duration
    await asyncio.gather(
        *(
            _worker(host, port, request, stop_at, warm_until, lat, errors, budget, expect_len)
            for _ in range(connections)
        )
    )
    elapsed = min(time.perf_counter(), stop_at) - warm_until
    lat.sort()

    def pct(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")

    return {
        "requests": len(lat),
        "seconds": round(elapsed, 3),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(pct(50), 2),
        "p90_ms": round(pct(90), 2),
        "p99_ms": round(pct(99), 2),
        "max_ms": round(1000 * lat[-1], 2) if lat else None,
        "errors": len(errors),
        "error_examples": errors[:3],
    }


def run_wrk(host: str, port: int, path: str, key: str, connections: int, duration: float) -> str | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    cmd = [
        exe,
        "-t1",
        f"-c{connections}",
        f"-d{int(duration)}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {key}",
        f"http://{host}:{port}{path}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument(
        "--target",
        choices=("certificate", "job"),
        default="certificate",
        help="certificate: GET /jobs/{id}/certificate (cached bytes); job: GET /jobs/{id} "
        "(a database read + pydantic per request, for comparison)",
    )
    ap.add_argument("--wrk", action="store_true", help="also measure with wrk when installed")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp, database() as db_url:
        key, job_id = seed_job(db_url, args.samples)
        with server(db_url, Path(tmp)) as (host, port, impl):
            import httpx

            path = f"/jobs/{job_id}" + ("/certificate" if args.target == "certificate" else "")
            first = httpx.get(f"http://{host}:{port}{path}", headers={"Authorization": f"Bearer {key}"})
            first.raise_for_status()
            if args.target == "certificate":
                assert len(first.json()["samples"]) == args.samples
            res = asyncio.run(
                load(
                    host,
                    port,
                    path,
                    key,
                    connections=args.connections,
                    duration=args.duration,
                    warmup=args.warmup,
                    max_requests=args.max_requests,
                    expect_len=len(first.content),
                )
            )
            res.update(
                target="GET " + path.replace(job_id, "{id}"),
                body_bytes=len(first.content),
                samples=args.samples,
                connections=args.connections,
                server=f"uvicorn 1 worker ({impl})",
                database=db_url.split(":", 1)[0],
                machine=f"{platform.machine()} {os.cpu_count()} CPU, Python {platform.python_version()}",
            )
            print(json.dumps(res, indent=2))
            if args.wrk:
                out = run_wrk(host, port, path, key, args.connections, args.duration)
                print(out if out is not None else "wrk not installed")
                res["wrk"] = out
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    ok = res["errors"] == 0 and res["rps"] >= 1500 and res["p99_ms"] < 50
    if args.target == "certificate":
        print("target (>= 1500 req/s, p99 < 50 ms):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
