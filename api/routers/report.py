"""Job report: GET /jobs/{id}/report (HTML; ?embed=1 -> the bare <div> for the dashboard),
/jobs/{id}/report.png (?figure= one of core.report.FIGURES) and /jobs/{id}/report.pdf.
POST /jobs/{id}/report/link makes a signed, expiring link, GET /shared/jobs/{id}/report?expires=&sig=,
that shows the HTML report without an Authorization header (api/report_links.py; 403 problem+json
when expired, altered or not signed here).

Rendered by core.report from the job's results (JobResult rows: certificate + metrics). Example
images x and T(x, delta) of the first certified test samples come from the examples.npz the worker
stored (metrics.examples_artifact_id); for jobs without one (run before it existed) they are rebuilt
when the job's dataset and transform can be rebuilt in the API process (built-in datasets, paths
under settings.data_roots and imagefolders in the S3 dataset folder, store.objects; not uploaded
artifacts, which only the worker resolves), otherwise the report says there are no examples. A
succeeded job is immutable, so rendered outputs are cached per job (LRU). Another tenant's job ->
404; a job that has not succeeded -> 409 problem+json."""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from api import report_links
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import PROBLEM_MEDIA_TYPE, ApiProblem
from api.lru import LruCache
from api.routers.jobs import succeeded_job
from core import report as core_report
from core.results import VariantResult

log = logging.getLogger("carcert.api")
router = APIRouter(prefix="/jobs", tags=["report"])
shared_router = APIRouter(prefix="/shared", tags=["report"])  # signed links: no Authorization header

EXAMPLE_DELTAS = core_report.EXAMPLE_DELTAS
CACHE_SIZE = 64
_RENDER_LOCK = threading.Lock()  # matplotlib is not documented thread-safe: render one at a time


def _cache(request: Request) -> LruCache[tuple[str, bytes]]:
    """(job_id, output variant...) -> (tenant, rendered bytes)."""
    cache = getattr(request.app.state, "report_cache", None)
    if cache is None:
        cache = request.app.state.report_cache = LruCache(CACHE_SIZE)
    return cache


def result_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    """JobResult rows -> the plain dicts core.report.render_report takes (the stored
    core.results.VariantResult fields plus certificate and metrics)."""
    return [
        {**VariantResult.from_row(r).model_dump(), "certificate": r.certificate, "metrics": r.metrics}
        for r in rows
    ]


def build_examples(
    spec_json: dict[str, Any], results: list[dict[str, Any]], settings: Any
) -> core_report.ExampleImages | None:
    """x and T(x, delta) for core.report.example_samples (certified ones first), or None
    when the dataset / transform cannot be rebuilt here (see the module docstring)."""
    import torch

    from core.data import load_dataset
    from core.spec import JobSpec
    from core.transforms import build_transform
    from store.objects import service_objects

    spec = JobSpec.model_validate(spec_json)
    uses_artifacts = [spec.dataset, spec.transform.encoder, spec.transform.decoder]
    if any(ref and ref.startswith("artifact:") for ref in uses_artifacts):
        return None
    samples = next(
        (
            r["certificate"]["samples"]
            for r in results
            if r.get("certificate") and r["certificate"].get("samples")
        ),
        [],
    )
    if not samples:
        return None
    chosen = core_report.example_samples(samples)
    indices = torch.tensor([int(s["index"]) for s in chosen], dtype=torch.int64)
    try:
        data = load_dataset(
            spec.dataset,
            seed=spec.seed,
            allowed_roots=list(settings.data_roots),
            train_subset=spec.train_subset,
            resize=spec.preprocess.resize,
            crop=spec.preprocess.crop,
            objects=service_objects(settings),  # imagefolder:s3:// (store.objects)
        )
        transform = build_transform(spec.transform, data=data, split="test")
        if int(indices.max()) >= data.test_x.shape[0]:
            return None
        return core_report.make_examples(data.test_x[indices], transform, EXAMPLE_DELTAS, indices, chosen)
    except Exception as exc:  # examples are illustrative: a report without them beats a 500
        log.info("report examples unavailable (%s): %s", spec.dataset, exc)
        return None


def stored_examples(
    session: Any, store: Any, tenant: str, results: list[dict[str, Any]]
) -> core_report.ExampleImages | None:
    """The examples.npz the worker stored for the first result with certificate samples, or None."""
    from store.artifacts import get_artifact

    first = next((r for r in results if (r.get("certificate") or {}).get("samples")), None)
    artifact_id = ((first or {}).get("metrics") or {}).get("examples_artifact_id")
    art = get_artifact(session, tenant, artifact_id) if isinstance(artifact_id, str) else None
    if art is None:
        return None
    try:
        return core_report.load_examples(store.local_path(art.storage_key), first["certificate"]["samples"])
    except Exception as exc:  # illustrative only: fall back to rebuilding them
        log.warning("stored report examples %s unreadable: %s", artifact_id, exc)
        return None


def _inputs(
    session: Any, settings: Any, store: Any, tenant: str, job_id: str
) -> tuple[list[dict[str, Any]], core_report.ExampleImages | None]:
    from store.jobs import get_results

    job = succeeded_job(session, tenant, job_id, "the report exists")
    seconds = (job.summary or {}).get("seconds")  # the report header's duration
    results = [{**r, "job_seconds": seconds} for r in result_dicts(get_results(session, job.id))]
    if not results:
        raise ApiProblem(404, "not-found", f"job {job_id} has no results", title="Not Found")
    examples = stored_examples(session, store, tenant, results)
    return results, examples if examples is not None else build_examples(job.spec, results, settings)


def _rendered(
    request: Request, session: Any, settings: Any, tenant: str, job_id: str, key: tuple, render
) -> bytes:
    cache = _cache(request)
    hit = cache.get((job_id, *key))
    if hit is not None and hit[0] == tenant:
        return hit[1]
    store = request.app.state.artifact_store
    results, examples = _inputs(session, settings, store, tenant, job_id)  # 404 / 409 for the wrong tenant
    with _RENDER_LOCK:
        body = render(results, examples)
    cache.put((job_id, *key), (tenant, body))
    return body


def _responses(*extra: int) -> dict[int | str, dict[str, Any]]:
    docs = {
        401: "Missing or invalid API key",
        404: "No such job for this tenant",
        409: "The job has not succeeded (yet)",
        422: "Invalid parameter",
        503: "The database is unavailable; retry later",
    }
    return {
        code: {"description": docs[code], "content": {PROBLEM_MEDIA_TYPE: {}}}
        for code in (401, 404, 409, 503, *extra)
    }


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    summary="HTML report with plots",
    responses={200: {"content": {"text/html": {}}}, **_responses()},
)
def get_report(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    embed: Annotated[bool, Query(description="only the report <div> (no <html>)")] = False,
) -> HTMLResponse:
    def render(results, examples) -> bytes:
        return core_report.render_report(
            results, examples, title=f"carcert report: job {job_id}", standalone=not embed
        ).encode()

    body = _rendered(request, session, settings, tenant, job_id, ("html", embed), render)
    return HTMLResponse(body, headers={"Cache-Control": "private, max-age=0"})


@router.post(
    "/{job_id}/report/link",
    summary="A signed, expiring link to the HTML report (opens without an API key)",
    responses=_responses(422),
)
def create_report_link(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    ttl: Annotated[
        int,
        Query(ge=60, le=report_links.MAX_TTL_S, description="seconds the link stays valid (default 7 days)"),
    ] = report_links.DEFAULT_TTL_S,
) -> dict[str, Any]:
    """{"url", "expires" (Unix seconds), "expires_at"}: GET url shows the report to anyone holding
    it until it expires (api/report_links.py)."""
    from datetime import UTC, datetime

    succeeded_job(session, tenant, job_id, "the report exists")
    expires = int(time.time()) + ttl
    secret = report_links.link_secret(request.app.state, settings.report_link_secret)
    query = urlencode({"expires": expires, "sig": report_links.sign(secret, tenant, job_id, expires)})
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    return {
        "url": f"{base}/shared/jobs/{job_id}/report?{query}",
        "expires": expires,
        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
    }


@shared_router.get(
    "/jobs/{job_id}/report",
    response_class=HTMLResponse,
    summary="The HTML report through a signed link (no Authorization header)",
    responses={
        200: {"content": {"text/html": {}}},
        403: {"description": "Expired, tampered or foreign link", "content": {PROBLEM_MEDIA_TYPE: {}}},
        422: {"description": "Invalid parameter", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
)
def get_shared_report(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    expires: Annotated[int, Query(description="Unix time (s) after which the link is refused")],
    sig: Annotated[str, Query(max_length=256, description="HMAC-SHA256 of the link (hex)")],
) -> HTMLResponse:
    from store.jobs import job_tenant

    tenant = job_tenant(session, job_id)
    secret = report_links.link_secret(request.app.state, settings.report_link_secret)
    why = report_links.refusal(secret, tenant, job_id, expires, sig)
    if why is not None:
        detail = (
            "this report link has expired; ask for a new one (carcert report JOB)"
            if why == "expired"
            else "this report link is not valid (altered, or not signed by this service)"
        )
        raise ApiProblem(403, f"report-link-{why}", detail, title="Forbidden")

    def render(results, examples) -> bytes:
        return core_report.render_report(results, examples, title=f"carcert report: job {job_id}").encode()

    body = _rendered(request, session, settings, tenant, job_id, ("html", False), render)
    headers = {"Cache-Control": "private, no-store", "Referrer-Policy": "no-referrer"}
    return HTMLResponse(body, headers=headers)


@router.get(
    "/{job_id}/report.png",
    response_class=Response,
    summary="One report figure as PNG",
    responses={200: {"content": {"image/png": {}}}, **_responses(422)},
)
def get_report_png(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    figure: Annotated[str, Query(description=f"one of {', '.join(core_report.FIGURES)}")] = "accuracy_pca",
) -> Response:
    if figure not in core_report.FIGURES:
        raise ApiProblem(
            422,
            "validation-error",
            f"figure: must be one of {', '.join(core_report.FIGURES)}",
            title="Invalid request",
        )

    def render(results, examples) -> bytes:
        if figure == "pareto" and len(results) < 2:
            raise ApiProblem(
                404,
                "not-found",
                f"job {job_id} has a single variant: no Pareto plot (a sweep has several)",
                title="Not Found",
            )
        if figure == "examples" and examples is None:
            raise ApiProblem(
                404,
                "not-found",
                f"job {job_id} has no example images (the dataset is not readable by the API process)",
                title="Not Found",
            )
        return core_report.render_figure_png(results, figure, examples)

    body = _rendered(request, session, settings, tenant, job_id, ("png", figure), render)
    return Response(body, media_type="image/png", headers={"Cache-Control": "private, max-age=0"})


@router.get(
    "/{job_id}/report.pdf",
    response_class=Response,
    summary="The report as a PDF",
    responses={200: {"content": {"application/pdf": {}}}, **_responses()},
)
def get_report_pdf(
    job_id: str, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> Response:
    body = _rendered(request, session, settings, tenant, job_id, ("pdf",), core_report.render_pdf)
    return Response(
        body,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="carcert-{job_id}-report.pdf"',
            "Cache-Control": "private, max-age=0",
        },
    )
