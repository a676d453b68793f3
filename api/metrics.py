"""Prometheus metrics (one registry per app): request counts and latency histogram by method,
route template and status, plus the number of jobs per status, read from the database at scrape
time. The job counts describe every tenant's activity, so they are served only with
`Authorization: Bearer <CARCERT_METRICS_TOKEN>`; without a configured token /metrics shows the
request metrics alone, and with one, /metrics requires it (401 otherwise).

The middleware is plain ASGI (no BaseHTTPMiddleware) so it adds microseconds, not a task."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiProblem
from api.schemas import problem_responses
from store.jobs import count_by_status, job_timings
from store.models import FINAL_STATUSES

log = logging.getLogger("carcert.api")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.private = CollectorRegistry(auto_describe=True)  # job counts: behind the metrics token
        self.requests = Counter(
            "carcert_http_requests_total",
            "HTTP requests",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "carcert_http_request_duration_seconds",
            "HTTP request latency",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class JobsCollector(Collector):
    """carcert_jobs{status=...}: jobs per status over all tenants (one GROUP BY per scrape)."""

    def __init__(self, sessionmaker: Callable) -> None:
        self.sessionmaker = sessionmaker

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily("carcert_jobs", "Jobs by status", labels=["status"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        fam = GaugeMetricFamily("carcert_jobs", "Jobs by status", labels=["status"])
        counts = dict.fromkeys(JOB_STATUSES, 0)
        try:
            with self.sessionmaker() as s:
                counts.update(count_by_status(s))
        except Exception as exc:  # the scrape must not fail because the database is down
            log.warning("metrics: cannot count jobs: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return
        for status, n in counts.items():
            fam.add_metric([status], n)
        yield fam


DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


def histogram(name: str, doc: str, samples: dict[str, list[float]], label: str) -> HistogramMetricFamily:
    """A Prometheus histogram family of `samples` {label value: [seconds, ...]} over DURATION_BUCKETS."""
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for key, values in sorted(samples.items()):
        buckets = [(repr(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
        fam.add_metric([key], [*buckets, ("+Inf", len(values))], sum_value=float(sum(values)))
    return fam


class JobTimingCollector(Collector):
    """Timings of the jobs the database holds (CARCERT_RETENTION_DAYS bounds them), read at scrape
    time: carcert_job_duration_seconds{status} (finished_at - started_at of finished jobs; the last
    attempt's), carcert_job_queue_wait_seconds{status} (started_at - created_at), carcert_job_stage_
    seconds{stage} (the worker's per-stage seconds) and carcert_workers (worker nodes whose sweep
    beat within max(3 sweep intervals, 60 s))."""

    def __init__(self, sessionmaker: Callable, settings: Any) -> None:
        self.sessionmaker, self.settings = sessionmaker, settings

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from store.workers import live_workers

        try:
            with self.sessionmaker() as s:
                rows = job_timings(s)
                workers = live_workers(s, max(3 * self.settings.sweep_interval_s, 60.0))
        except Exception as exc:  # the scrape must not fail because the database is down
            log.warning("metrics: cannot read job timings: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return
        duration: dict[str, list[float]] = {}
        wait: dict[str, list[float]] = {}
        stages: dict[str, list[float]] = {}
        for status, created, started, finished, stage_seconds in rows:
            if started is not None:
                wait.setdefault(status, []).append(max(0.0, (started - created).total_seconds()))
            if started is not None and finished is not None and status in FINAL_STATUSES:
                duration.setdefault(status, []).append(max(0.0, (finished - started).total_seconds()))
            for stage, seconds in (stage_seconds or {}).items():
                stages.setdefault(str(stage), []).append(float(seconds))
        yield histogram("carcert_job_duration_seconds", "Run time of finished jobs", duration, "status")
        yield histogram("carcert_job_queue_wait_seconds", "Queue wait of started jobs", wait, "status")
        yield histogram("carcert_job_stage_seconds", "Seconds per pipeline stage", stages, "stage")
        yield GaugeMetricFamily("carcert_workers", "Worker nodes alive (recent heartbeat)", value=workers)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition"},
        **problem_responses(401),
    },
)
def metrics(request: Request) -> Response:
    """Request metrics; with the configured CARCERT_METRICS_TOKEN as bearer token, job counts too."""
    token = request.app.state.settings.metrics_token
    body = generate_latest(request.app.state.metrics.registry)
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiProblem(
                401,
                "unauthorized",
                "GET /metrics needs 'Authorization: Bearer <metrics token>' (CARCERT_METRICS_TOKEN)",
                title="Unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="carcert-metrics"'},
            )
        body += generate_latest(request.app.state.metrics.private)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
