"""Liveness (/healthz: the process answers) and readiness (/readyz: database and broker reachable,
503 problem+json otherwise). Neither needs an API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.errors import ProblemResponse, problem
from api.schemas import Health, Problem

log = logging.getLogger("carcert.api")
router = APIRouter(tags=["health"])
PROBLEM = {"model": Problem, "description": "Problem details (application/problem+json)"}


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


def _check_db(request: Request) -> None:
    with request.app.state.sessionmaker() as s:
        s.execute(text("SELECT 1"))


def _check_broker(request: Request) -> None:
    from kombu import Connection

    url = request.app.state.settings.broker_url
    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: database and broker reachable",
    responses={503: PROBLEM},
)
async def readyz(request: Request) -> Health | ProblemResponse:
    checks: dict[str, str] = {}
    for name, fn in (("database", _check_db), ("broker", _check_broker)):
        try:
            await run_in_threadpool(fn, request)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readyz: %s unreachable: %s", name, _first_line(exc))
            checks[name] = "unreachable"
    if all(v == "ok" for v in checks.values()):
        return Health(status="ok", checks=checks)
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    return problem(
        request,
        503,
        f"Not ready: {down} unreachable.",
        slug="not-ready",
        title="Service Unavailable",
        headers={"Retry-After": "5"},
        extra={"checks": checks},
    )
