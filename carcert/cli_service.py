"""Service commands: `carcert up | serve | worker | keys create [--if-none] | migrate | demo`.

`up` is the embedded all-in-one (no external servers): SQLite database and the kombu SQLAlchemy
transport on SQLite as broker, artifacts and scratch space under ./var, the API (uvicorn) in this
process and a real Celery worker as a subprocess. `serve` and `worker` run each part against the
configured servers (CARCERT_DATABASE_URL, CARCERT_BROKER_URL, ...; see store/settings.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carcert.supervisor import WorkerSupervisor, print_restart, stop_process

EMBEDDED_TENANT = "local"


# ------------------------------------------------------------------------------------------ helpers


def embedded_env(var: Path) -> dict[str, str]:
    """CARCERT_* settings of the embedded all-in-one rooted at `var`."""
    var = var.resolve()
    return {
        "CARCERT_DATABASE_URL": f"sqlite:///{var / 'carcert.db'}",
        "CARCERT_BROKER_URL": f"sqla+sqlite:///{var / 'broker.db'}",
        "CARCERT_ARTIFACT_BACKEND": "local",
        "CARCERT_ARTIFACT_ROOT": str(var / "artifacts"),
        "CARCERT_WORK_ROOT": str(var / "work"),
    }


def _apply_env(env: dict[str, str]) -> None:
    from store.db import reset_caches

    os.environ.update(env)
    reset_caches()


def migrate() -> None:
    from store.db import init_db

    init_db()


def ensure_key(var: Path, tenant: str = EMBEDDED_TENANT) -> str:
    """Reuse the key stored in var/api_key if it still authenticates, else create and store one."""
    from store.db import session_scope
    from store.keys import authenticate, create_api_key

    path = var / "api_key"
    if path.is_file():
        key = path.read_text().strip()
        with session_scope() as s:
            if authenticate(s, key) is not None:
                return key
    with session_scope() as s:
        key = create_api_key(s, tenant, "carcert up")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port for the API (handed to uvicorn), so a busy port fails
    before anything starts; OSError (e.g. EADDRINUSE) otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is not busy
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def worker_command(
    pool: str = "solo", concurrency: int = 1, loglevel: str = "info", queue: str | None = None
) -> list[str]:
    """`celery worker` argv for this interpreter; queue defaults to settings.queue."""
    if queue is None:
        from store.settings import get_settings

        queue = get_settings().queue
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--queues",
        queue,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"carcert-{os.getpid()}@%h",
    ]


def api_command(port: int, host: str = "127.0.0.1", *extra: str) -> list[str]:
    """`uvicorn` argv serving api.main:create_app in one process for this interpreter; `extra`
    are further uvicorn options (e.g. "--loop", "uvloop", "--no-access-log")."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- up


def declare_queue() -> None:
    """Declare the job queue on the broker once (idempotent), before several workers start: on the
    embedded SQLite broker, workers that all create it at once fail on its unique name."""
    from store.settings import get_settings
    from worker.queue import sender

    app = sender()
    with app.connection_for_write() as conn:
        app.amqp.queues[get_settings().queue].bind(conn.default_channel).declare()


def embedded_worker_env(index: int, workers: int, env: dict[str, str]) -> dict[str, str]:
    """Settings of embedded worker `index` of `workers`: its GPU index, and torch threads split
    between the workers (cores // workers, at least 1) unless CARCERT_TORCH_THREADS is set."""
    out = {"CARCERT_WORKER_INDEX": str(index)}
    if not env.get("CARCERT_TORCH_THREADS"):
        out["CARCERT_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return out


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    try:  # before anything starts or is printed: a busy port is a clear error, not a late traceback
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        print(
            f"carcert up: error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
            "is another service using it? Choose another with --port",
            file=sys.stderr,
        )
        return 1
    var = Path(args.var).resolve()
    var.mkdir(parents=True, exist_ok=True)
    _apply_env(embedded_env(var))
    migrate()
    key = ensure_key(var)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_repo_root()), os.environ.get("PYTHONPATH")])),
    }
    log_path = var / "worker.log"
    log_file = None if args.verbose else open(log_path, "ab")  # noqa: SIM115
    workers = max(1, int(args.workers))

    def starter(index: int) -> Callable[[], subprocess.Popen]:
        cmd = worker_command(loglevel="info")
        if index:  # worker 0 keeps the name of the single-worker embedded mode
            cmd[cmd.index("--hostname") + 1] = f"carcert-{os.getpid()}-{index}@%h"
        wenv = {**env, **embedded_worker_env(index, workers, env)}
        return lambda: subprocess.Popen(
            cmd, env=wenv, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
            start_new_session=True,
        )

    declare_queue()  # kombu's SQLite transport: workers declaring a new queue at once collide
    # a worker that dies (crash, OOM, kill -9) is restarted with backoff; the API stays up
    supervisors = [WorkerSupervisor(starter(i), on_restart=print_restart(log_path)) for i in range(workers)]
    from api.main import create_app
    from store.settings import get_settings

    config = uvicorn.Config(
        create_app(get_settings()),
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
    )
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{args.port}"
    print(f"carcert is up at {url}  (API docs: {url}/docs)", flush=True)
    print(f"API key (tenant {EMBEDDED_TENANT!r}, stored in {var / 'api_key'}): {key}", flush=True)
    print(f"client: export CARCERT_URL={url} CARCERT_API_KEY={key}; carcert jobs", flush=True)
    print(f"data in {var}; {workers} worker(s), log: {'console' if args.verbose else log_path}; Ctrl-C stops",
          flush=True)

    def on_term(signum: int, _frame: Any) -> None:
        # uvicorn re-raises the signal it caught after its graceful shutdown: turn SIGTERM into an
        # exception so the worker below is stopped too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        print("carcert up: stopping the worker(s)...", flush=True)
        for supervisor in supervisors:
            supervisor.stop()
        if log_file:
            log_file.close()
    return 0


# ------------------------------------------------------------------------------------ serve/worker


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.migrate:
        migrate()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,
        log_level=args.loglevel,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.index is not None:
        os.environ["CARCERT_WORKER_INDEX"] = str(args.index)
        from store.db import reset_caches

        reset_caches()
    if args.migrate:
        migrate()
    from worker.celery_app import app

    cmd = worker_command(args.pool, args.concurrency, args.loglevel)
    argv = cmd[cmd.index("-A") + 2 :]  # from "worker" on
    app.worker_main(argv)
    return 0


# ----------------------------------------------------------------------------------- keys/migrate


def cmd_keys_create(args: argparse.Namespace) -> int:
    if args.if_none:
        key = create_key_if_none(args.tenant, args.name or "")
        if key is None:
            print("carcert: an API key exists already; none created (--if-none)", file=sys.stderr)
            return 0
    else:
        from store.db import session_scope
        from store.keys import create_api_key

        with session_scope() as s:
            key = create_api_key(s, args.tenant, args.name or "")
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from store.db import session_scope
    from store.keys import list_api_keys

    with session_scope() as s:
        rows = [
            (k.id, k.tenant, k.name, k.prefix, k.created_at, k.revoked_at)
            for k in list_api_keys(s, args.tenant)
        ]
    print(f"{'id':<32}  {'tenant':<20} {'name':<16} {'prefix':<12} {'created_at':<20} revoked_at")
    for kid, tenant, name, prefix, created, revoked in rows:
        if revoked is not None and not args.all:
            continue
        when = created.strftime("%Y-%m-%d %H:%M:%S")
        gone = revoked.strftime("%Y-%m-%d %H:%M:%S") if revoked else "-"
        print(f"{kid:<32}  {tenant[:20]:<20} {(name or '-')[:16]:<16} {prefix + '...':<12} {when:<20} {gone}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from store.db import session_scope
    from store.keys import revoke_api_key

    with session_scope() as s:
        done = revoke_api_key(s, args.tenant, args.key_id)
    if not done:
        print(
            f"carcert: error: no API key {args.key_id!r}"
            + (f" of tenant {args.tenant!r}" if args.tenant else ""),
            file=sys.stderr,
        )
        return 1
    print(f"revoked {args.key_id} (the API refuses it within 30 s, the life of its key cache)")
    return 0


def create_key_if_none(tenant: str, name: str = "") -> str | None:
    """Create a key for `tenant` when no unrevoked key exists at all (first start of a deployment);
    its plaintext, else None. On Postgres a transaction-scoped advisory lock makes two concurrent
    callers create at most one key."""
    from sqlalchemy import text

    from store.db import session_scope
    from store.keys import active_key_count, create_api_key

    with session_scope() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext('carcert keys create --if-none'))"))
        if active_key_count(s) > 0:
            return None
        return create_api_key(s, tenant, name)


def cmd_migrate(args: argparse.Namespace) -> int:
    from store.db import downgrade_db, init_db

    if args.downgrade:
        downgrade_db(revision=args.downgrade)
        print(f"database downgraded to {args.downgrade}")
    else:
        init_db()
        print("database at the latest revision")
    return 0


# ------------------------------------------------------------------------------------------- demo

DEMO_SPEC: dict[str, Any] = {
    "kind": "prune",
    "model": {"arch": "small_cnn"},
    "dataset": "digits",
    "transform": {"kind": "parametric", "name": "illumination"},
    "pruning": {
        "method": "car",
        "prune_ratio": 0.5,
        "pretrain_epochs": 8,
        "search_epochs": 3,
        "finetune_epochs": 3,
        "augment_q": 500,
        "batch_size": 64,
        "lr": 0.05,
    },
    "certification": {"n": 100, "l": 10, "samples": 50},
    "seed": 0,
}


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy within {timeout:.0f} s")


def _fmt(x: Any, pct: bool = True) -> str:
    return "-" if x is None else (f"{100 * float(x):.1f}%" if pct else str(x))


def cmd_demo(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    var = Path(args.var).resolve()
    var.mkdir(parents=True, exist_ok=True)
    _apply_env(embedded_env(var))
    migrate()
    from store.db import session_scope
    from store.keys import create_api_key

    with session_scope() as s:
        key = create_api_key(s, "demo", "carcert demo")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_repo_root()), os.environ.get("PYTHONPATH")])),
    }
    print(f"starting the embedded service (carcert up) at {url} ...", flush=True)
    up = subprocess.Popen(
        [sys.executable, "-m", "carcert.cli", "up", "--port", str(port), "--var", str(var)],
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(url, up)
        headers = {"Authorization": f"Bearer {key}"}
        spec = dict(DEMO_SPEC)
        if args.quick:
            spec = {
                **spec,
                "train_subset": 400,
                "pruning": {
                    **spec["pruning"],
                    "pretrain_epochs": 2,
                    "search_epochs": 1,
                    "finetune_epochs": 1,
                },
                "certification": {"n": 20, "l": 3, "samples": 10},
            }
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            r = http.post("/jobs", json=spec)
            if r.status_code >= 300:
                print(f"submit failed: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            job = r.json()
            print(
                f"job {job['id']} submitted: small_cnn on digits, CAR pruning 50%, illumination, "
                f"CC-Cert n={spec['certification']['n']} l={spec['certification']['l']} "
                f"on {spec['certification']['samples']} test samples",
                flush=True,
            )
            t0 = time.monotonic()
            with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}]") as bar:
                while job["status"] not in ("succeeded", "failed", "cancelled"):
                    time.sleep(0.5)
                    job = http.get(f"/jobs/{job['id']}").json()
                    bar.set_description(f"{job['status']}: {job.get('stage') or '-'}")
                    bar.update(round(100 * float(job.get("progress") or 0.0), 1) - bar.n)
                    if time.monotonic() - t0 > args.timeout:
                        print("demo timed out; cancelling the job", file=sys.stderr)
                        http.post(f"/jobs/{job['id']}/cancel")
                        return 1
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job.get('error')}", file=sys.stderr)
                return 1
            return _demo_report(http, job, var, time.monotonic() - t0)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(up)
        print("embedded service stopped.", flush=True)


def _fmt_p(p: Any) -> str:
    return "-" if p is None else f"{float(p):.3g}"


def _demo_report(http: Any, job: dict[str, Any], var: Path, seconds: float) -> int:
    out = var / "demo" / job["id"]
    out.mkdir(parents=True, exist_ok=True)
    cert_r = http.get(f"/jobs/{job['id']}/certificate")
    cert = cert_r.json() if cert_r.status_code == 200 else {}
    (out / "certificate.json").write_bytes(cert_r.content)
    model_r = http.get(f"/jobs/{job['id']}/model")
    if model_r.status_code == 200:
        (out / "model.safetensors").write_bytes(model_r.content)
    variants = (job.get("summary") or {}).get("variants") or [{}]
    v = variants[0]
    sparsity = v.get("sparsity", (cert.get("model") or {}).get("sparsity"))
    print(f"\njob {job['id']} succeeded in {seconds:.0f} s")
    print(f"  accuracy  {_fmt(v.get('accuracy', cert.get('accuracy')))}")
    print(
        f"  PCA       {_fmt(v.get('pca', cert.get('pca')))}  (certified samples / samples, epsilon "
        f"{(cert.get('params') or {}).get('epsilon', '-')}, failure probability "
        f"{_fmt_p(cert.get('failure_probability'))})"
    )
    print(f"  sparsity  {_fmt(sparsity)}")
    print(f"  certificate: {out / 'certificate.json'}   (GET /jobs/{job['id']}/certificate)")
    if model_r.status_code == 200:
        print(f"  model:       {out / 'model.safetensors'}   (GET /jobs/{job['id']}/model)")
    return 0


# ------------------------------------------------------------------------------------------ parser


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="embedded all-in-one: API + Celery worker on SQLite (no servers needed)")
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=int, default=8000, help="port the API listens on")
    p.add_argument(
        "--data-dir",
        "--var",
        dest="var",
        default="var",
        metavar="DIR",
        help="data folder: database, broker, artifacts, API key",
    )
    p.add_argument("--verbose", action="store_true", help="show the API and worker logs on the console")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (a sweep's variants run in parallel; torch threads are split)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="the REST API against the configured database and broker")
    p.add_argument("--host", default="0.0.0.0", help="address the API listens on")
    p.add_argument("--port", type=int, default=8000, help="port the API listens on")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--migrate", action="store_true", help="upgrade the database schema first")
    p.add_argument("--loglevel", default="info", help="uvicorn log level (debug, info, warning, ...)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a Celery worker against the configured database and broker")
    p.add_argument("--pool", default="prefork", choices=("prefork", "solo", "threads"), help="Celery pool")
    p.add_argument("--concurrency", type=int, default=1, help="processes (one GPU each when present)")
    p.add_argument("--index", type=int, default=None, help="GPU index offset of this worker")
    p.add_argument("--migrate", action="store_true", help="upgrade the database schema first")
    p.add_argument("--loglevel", default="info", help="Celery log level (debug, info, warning, ...)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="API keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    k = ksub.add_parser("create", help="create an API key for a tenant (prints it once)")
    k.add_argument("--tenant", required=True, help="the tenant the key acts for")
    k.add_argument("--name", default="", help="a note to recognise the key by in `keys list`")
    k.add_argument(
        "--if-none",
        action="store_true",
        help="only when no unrevoked key exists (first start); otherwise create nothing, exit 0",
    )
    k.set_defaults(func=cmd_keys_create)
    k = ksub.add_parser("list", help="list API keys (id, tenant, name, prefix; never the key itself)")
    k.add_argument("--tenant", default=None, help="only this tenant's keys (default: every tenant)")
    k.add_argument("--all", action="store_true", help="also the revoked keys")
    k.set_defaults(func=cmd_keys_list)
    k = ksub.add_parser("revoke", help="revoke an API key by its id (from `carcert keys list`)")
    k.add_argument("key_id", help="the key's id (not the key itself)")
    k.add_argument("--tenant", default=None, help="only if the key belongs to this tenant")
    k.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    p.add_argument("--downgrade", metavar="REVISION", default=None, help="downgrade instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="run a small real job through the embedded service")
    p.add_argument("--var", default="var", help="data folder of the embedded service")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    p.add_argument("--quick", action="store_true", help="an even smaller job (a few seconds)")
    p.set_defaults(func=cmd_demo)
