"""Deployment commands (docker-compose.yml): `carcert bootstrap` and `carcert health worker`.

`bootstrap` is the one-shot first-start step of a deployment: upgrade the database schema, create
the S3 bucket when the artifact backend is s3, and create an API key when none exists yet (printed
once, to stdout, i.e. the container log). Running it again changes nothing and prints no key.

`health worker` exits 0 when a Celery worker on this host is alive (worker.health), else 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from carcert.cli_service import create_key_if_none, migrate
    from store.artifacts import S3ArtifactStore, make_artifact_store
    from store.settings import get_settings

    migrate()
    print("bootstrap: database at the latest revision", flush=True)
    store = make_artifact_store(get_settings())
    if isinstance(store, S3ArtifactStore):
        created = store.ensure_bucket()
        print(f"bootstrap: bucket {store.bucket!r} {'created' if created else 'exists'}", flush=True)
    key = create_key_if_none(args.tenant, "bootstrap")
    if key is None:
        print("bootstrap: an API key exists already; none created", flush=True)
    else:
        print(f"bootstrap: API key for tenant {args.tenant!r} (shown once, stored hashed):", flush=True)
        print(key, flush=True)
    return 0


def cmd_health_worker(args: argparse.Namespace) -> int:
    from worker.health import worker_alive

    try:
        why = worker_alive(timeout=args.timeout)
    except Exception as exc:  # broker or database unreachable: unhealthy, with the reason
        print(f"worker unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if why is None:
        msg = "worker unhealthy: no worker on this host answered a ping or holds a job lease"
        print(msg, file=sys.stderr)
        return 1
    print(f"worker healthy: {why}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="first start of a deployment: migrate, create the S3 bucket, create an API key if none",
    )
    p.add_argument("--tenant", default="admin", help="tenant of the first API key (default: admin)")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("health", help="health checks for container orchestration")
    hsub = p.add_subparsers(dest="health_command", required=True, metavar="SUBCOMMAND")
    h = hsub.add_parser("worker", help="exit 0 when a Celery worker on this host is alive, else 1")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a ping reply")
    h.set_defaults(func=cmd_health_worker)
