"""The FastAPI application: `create_app(settings=None) -> FastAPI`.

Run: `uvicorn --factory api.main:create_app --workers 1` (uvloop/httptools when installed).
Everything the app needs (settings, engine, session factory, artifact store, caches, metrics) lives
on `app.state`, so tests can build several apps with different settings in one process."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from sqlalchemy.orm import sessionmaker

from api.auth import KeyCache
from api.errors import PROBLEM_MEDIA_TYPE, install_error_handlers
from api.fastpath import CertificateFastPath
from api.lru import LruCache
from api.metrics import ApiMetrics, JobsCollector, JobTimingCollector, MetricsMiddleware
from api.metrics import router as metrics_router
from api.routers import artifacts, dashboard, health, jobs, report
from api.schemas import Problem, SweepCertificates

log = logging.getLogger("carcert.api")
STATIC_DOCS_URL = "/static-docs"

DESCRIPTION = """Compress image classifiers and certify them against semantic perturbations
(CAR pruning + CC-Cert). Authenticate with `Authorization: Bearer <api key>`. Every error is an
RFC 9457 `application/problem+json` document."""


def create_app(settings: Any = None) -> FastAPI:
    """Build the app on `settings` (default: store.settings.get_settings())."""
    from store.artifacts import make_artifact_store
    from store.db import make_engine
    from store.settings import get_settings

    settings = settings or get_settings()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=_warm_imports, name="carcert-warm-imports", daemon=True).start()
        yield
        engine.dispose()

    # FastAPIOffline: a FastAPI app whose /docs and /redoc load their scripts and styles from this
    # server (STATIC_DOCS_URL, the fastapi-offline package's files), not from a CDN
    app = FastAPIOffline(
        title="carcert",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=STATIC_DOCS_URL,
        swagger_ui_parameters={"validatorUrl": None},  # no badge from the online spec validator
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessionmaker(bind=engine, expire_on_commit=False)
    app.state.artifact_store = make_artifact_store(settings)
    app.state.key_cache = KeyCache()
    app.state.cert_cache = LruCache(jobs.CERT_CACHE_SIZE, ttl_s=jobs.CERT_CACHE_TTL_S)
    app.state.metrics = ApiMetrics()
    app.state.metrics.private.register(JobsCollector(app.state.sessionmaker))
    app.state.metrics.private.register(JobTimingCollector(app.state.sessionmaker, settings))

    install_error_handlers(app)
    app.add_middleware(CertificateFastPath, state=app.state)  # inner: counted by the metrics
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(artifacts.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(report.router)
    app.include_router(report.shared_router)
    app.include_router(dashboard.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _warm_imports() -> None:
    """Import the torch-backed checks (transform names, checkpoint loading) in the background at
    start-up, so the first POST /jobs or weights upload does not pay the seconds of `import torch`."""
    try:
        importlib.import_module("core.transforms")
    except Exception as exc:  # the checks import it again on demand and report any problem there
        log.warning("warm-up import of core.transforms failed: %s", exc)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("carcert")
    except Exception:
        return "0.0.0"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with every 4xx/5xx response as application/problem+json (Problem), and the
    default 422 HTTPValidationError replaced by Problem."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    ref_tpl = "#/components/schemas/{model}"
    for model in (Problem, SweepCertificates):
        js = model.model_json_schema(ref_template=ref_tpl)
        comps.update(js.pop("$defs", {}))
        comps[model.__name__] = js
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            for code, resp in op.get("responses", {}).items():
                if code[:1] not in ("4", "5"):
                    continue
                resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
                if code == "422":
                    resp["description"] = "Validation error (problem+json with the field errors)"
            op["responses"].setdefault(
                "500",
                {
                    "description": "Unexpected error (no internals)",
                    "content": {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}},
                },
            )
    for unused in ("HTTPValidationError", "ValidationError"):
        comps.pop(unused, None)
    app.openapi_schema = schema
    return schema
