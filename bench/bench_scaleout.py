"""Scale-out: wall time of a 6-variant sweep and of a sharded certification on 1 and on 2 real Celery
workers (the embedded backend: SQLite database + SQLite broker, the `carcert up --workers N` setup),
one torch thread per worker; checks that the certificates are byte-identical across worker counts.

    flock /tmp/carcert-cpu.lock python bench/bench_scaleout.py [--workers 1 2] [--quick]

Wall time runs from sending the job to its final status (workers already started and idle). Prints
one JSON line per run and a summary; results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP: dict[str, Any] = {
    "kind": "prune", "model": {"arch": "small_cnn"}, "dataset": "digits",
    "transform": {"kind": "parametric", "name": "brightness"},
    "pruning": {"method": "car", "prune_ratio": 0.5, "pretrain_epochs": 2, "search_epochs": 4,
                "finetune_epochs": 4, "augment_q": 200, "batch_size": 64},
    "sweep_methods": ["car", "lmp"], "sweep_prune_ratios": [0.3, 0.5, 0.7],
    "certification": {"n": 50, "l": 4, "samples": 100, "t_steps": 100},
    "seed": 0,
}
CERTIFY: dict[str, Any] = {
    "kind": "certify", "dataset": "digits", "transform": {"kind": "parametric", "name": "brightness"},
    "certification": {"n": 100, "l": 10, "samples": 359, "t_steps": 100, "batch_size": 500}, "seed": 0,
}


def _env(var: Path) -> dict[str, str]:
    return {
        "CARCERT_DATABASE_URL": f"sqlite:///{var / 'db.sqlite'}",
        "CARCERT_BROKER_URL": f"sqla+sqlite:///{var / 'broker.sqlite'}",
        "CARCERT_ARTIFACT_BACKEND": "local", "CARCERT_ARTIFACT_ROOT": str(var / "artifacts"),
        "CARCERT_WORK_ROOT": str(var / "work"), "CARCERT_DATA_ROOTS": f'["{var / "data"}"]',
        "CARCERT_TORCH_THREADS": "1", "CARCERT_QUEUE": "bench",
    }


class Service:
    """N worker processes on a fresh embedded backend under `var`."""

    def __init__(self, var: Path, workers: int) -> None:
        from carcert.cli_service import declare_queue, worker_command
        from store.db import init_db, reset_caches

        (var / "data").mkdir(parents=True)
        self.env = _env(var)
        os.environ.update(self.env)
        reset_caches()
        init_db()
        declare_queue()
        self.procs, self.logs = [], []
        for i in range(workers):
            cmd = worker_command(pool="solo", loglevel="info", queue="bench")
            cmd[cmd.index("--hostname") + 1] = f"bench-{i}@%h"
            log = var / f"worker{i}.log"
            self.logs.append(log)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "CARCERT_WORKER_INDEX": str(i)}
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"),  # noqa: SIM115
                                               stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not all(" ready." in log.read_text(errors="replace") for log in self.logs):
            if time.monotonic() > deadline:
                raise SystemExit("workers not ready")
            time.sleep(0.2)

    def run(self, spec: dict[str, Any]) -> tuple[float, Any]:
        from core.spec import JobSpec
        from store import jobs as repo
        from store.db import session_scope
        from store.models import Job
        from worker.queue import dispatch

        with session_scope() as s:
            job, _ = repo.create_job(s, "bench", JobSpec.model_validate(spec))
        t0 = time.perf_counter()
        dispatch(job.id, queue="bench")
        while True:
            with session_scope() as s:
                row = s.get(Job, job.id)
                if row.status in ("succeeded", "failed", "cancelled"):
                    wall = time.perf_counter() - t0
                    assert row.status == "succeeded", row.error
                    return wall, job.id
            time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(60)


def _certificates(job_id: str) -> dict[str, str]:
    """{variant: certificate body (canonical JSON without job_id / created_at)}."""
    from core.certify import certificate_body
    from store import jobs as repo
    from store.db import session_scope

    with session_scope() as s:
        return {r.name: certificate_body(r.certificate) for r in repo.get_results(s, job_id)}


def _model_of(job_id: str, variant: str, dest: Path) -> tuple[Path, Path]:
    """The sweep's `variant` model and mask files, copied to `dest` (a data root)."""
    from store import jobs as repo
    from store.artifacts import get_artifact_store
    from store.db import session_scope
    from store.models import Artifact

    store = get_artifact_store()
    with session_scope() as s:
        res = next(r for r in repo.get_results(s, job_id) if r.name == variant)
        out = []
        files = ((res.model_artifact_id, "model.safetensors"), (res.mask_artifact_id, "mask.safetensors"))
        for art_id, name in files:
            shutil.copy(store.local_path(s.get(Artifact, art_id).storage_key), dest / name)
            out.append(dest / name)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = ap.parse_args()
    sweep, certify = json.loads(json.dumps(SWEEP)), json.loads(json.dumps(CERTIFY))
    if args.quick:
        sweep["pruning"].update(pretrain_epochs=1, search_epochs=1, finetune_epochs=1, augment_q=50)
        sweep["train_subset"] = 300
        certify["certification"].update(samples=40, l=2)
    results: dict[int, dict[str, Any]] = {}
    base = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        for n in args.workers:
            svc = Service(base / f"w{n}", n)
            try:
                sweep_s, sweep_job = svc.run(sweep)
                weights, mask = _model_of(sweep_job, "car-0.50", base / f"w{n}" / "data")
                cert_spec = {**certify, "model": {"arch": "small_cnn", "weights": str(weights)},
                             "mask": str(mask), "certification": {**certify["certification"], "shards": n}}
                cert_s, cert_job = svc.run(cert_spec)
                results[n] = {"workers": n, "sweep_s": round(sweep_s, 2), "certify_s": round(cert_s, 2),
                              "sweep": _certificates(sweep_job), "certify": _certificates(cert_job)}
                timing = {k: v for k, v in results[n].items() if k not in ("sweep", "certify")}
            finally:
                svc.stop()
            print(json.dumps(timing), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one = results.get(min(results))
    for n, r in sorted(results.items()):
        same = r["sweep"] == one["sweep"] and r["certify"] == one["certify"]
        print(f"workers={n}: sweep {r['sweep_s']:.1f} s ({r['sweep_s'] / one['sweep_s']:.2f}x), "
              f"sharded certify {r['certify_s']:.1f} s ({r['certify_s'] / one['certify_s']:.2f}x); "
              f"{len(r['sweep'])} variants; certificates identical to {min(results)} worker(s): {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
