"""Jobs: submit (idempotent), list (keyset cursor), get, cancel, and the results: certificate,
mask, model and evidence files.

The certificate of a succeeded job never changes, so its rendered JSON bytes are cached per
(job id, variant) in an `api.lru.LruCache` and returned with a plain Response: a hot GET costs no
database round trip and no pydantic re-validation of the document. Another tenant's job answers
404, never 403."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.checks import check_job_spec, check_webhook, check_work
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiProblem
from api.lru import LruCache
from api.schemas import (
    JobLogs,
    JobOut,
    JobPage,
    JobStatus,
    LogLine,
    UnitOut,
    WebhookDelivery,
    problem_responses,
)
from core.spec import LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, JobSpec
from store.artifacts import ArtifactMissing, get_artifact
from store.jobs import IdempotencyConflict, InvalidCursor, create_job, get_results, request_cancel
from store.jobs import get_job as repo_get
from store.jobs import list_jobs as repo_list
from worker.queue import dispatch

log = logging.getLogger("carcert.api")
FILE_SUFFIX = {"evidence": "evidence.npz", "pt2": "model.pt2", "onnx": "model.onnx"}  # download names
router = APIRouter(prefix="/jobs", tags=["jobs"])

FINAL = ("succeeded", "failed", "cancelled")
CERT_CACHE_SIZE = 512
CERT_CACHE_CONTROL = "private, max-age=0, must-revalidate"
# a deleted job's certificate leaves this process's cache at once, another API process's within this
CERT_CACHE_TTL_S = 60.0


def job_not_found(job_id: str) -> ApiProblem:
    return ApiProblem(404, "not-found", f"job {job_id!r} not found", title="Not Found")


def tenant_job(session: Any, tenant: str, job_id: str) -> Any:
    """The tenant's job; 404 problem when it is not the tenant's (or does not exist)."""
    job = repo_get(session, tenant, job_id)
    if job is None:
        raise job_not_found(job_id)
    return job


def job_conflict(job: Any, problem_type: str, advice: str) -> ApiProblem:
    """409 problem `problem_type`: "job <id> is <status>; <advice>", with job_status."""
    return ApiProblem(
        409,
        problem_type,
        f"job {job.id} is {job.status}; {advice}",
        title="Conflict",
        extra={"job_status": job.status},
    )


def succeeded_job(session: Any, tenant: str, job_id: str, what: str = "results exist") -> Any:
    """The tenant's job if it has succeeded; 404 when it is not the tenant's (or does not exist),
    409 problem "job-not-succeeded" (with job_status) otherwise. `what` names what the caller wanted."""

    job = tenant_job(session, tenant, job_id)
    if job.status != "succeeded":
        raise job_conflict(job, "job-not-succeeded", f"{what} only once it has succeeded")
    return job


def select_variant(results: list[Any], job_id: str, variant: str | None) -> list[Any]:
    """All results (variant None) or the one named `variant` (404 naming the variants there are)."""
    if variant is None:
        return results
    chosen = [r for r in results if r.name == variant]
    if not chosen:
        names = ", ".join(r.name for r in results) or "(none)"
        raise ApiProblem(
            404, "not-found", f"job {job_id} has no variant {variant!r}; variants: {names}", title="Not Found"
        )
    return chosen


def job_out(job: Any) -> JobOut:
    base = f"/jobs/{job.id}"
    links = {"self": base, "cancel": f"{base}/cancel"}
    if job.status == "succeeded":
        links.update(
            certificate=f"{base}/certificate",
            mask=f"{base}/mask",
            model=f"{base}/model",
            evidence=f"{base}/evidence",
        )
    spec = _spec(finite_json(job.spec))
    return JobOut(
        id=job.id,
        name=getattr(spec, "name", None),
        labels=getattr(spec, "labels", None) or {},
        kind=job.kind,
        status=job.status,
        stage=job.stage,
        progress=job.progress or 0.0,
        cancel_requested=bool(job.cancel_requested),
        attempts=job.attempts or 0,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=finite_json(job.error),
        summary=finite_json(job.summary),
        spec=spec,
        links=links,
        webhook=webhook_out(job),
        units=[UnitOut(name=u.name, status=u.status, stage=u.stage, progress=u.progress or 0.0,
                       attempts=u.attempts or 0, started_at=u.started_at, finished_at=u.finished_at)
               for u in getattr(job, "units", None) or []],
    )


def webhook_out(job: Any) -> WebhookDelivery | None:
    """The job's webhook delivery record (None: the job has no webhook)."""
    if job.webhook_state is None:
        return None
    return WebhookDelivery(state=job.webhook_state, **(job.webhook_delivery or {}))


def _spec(raw: dict[str, Any]) -> JobSpec:
    """The stored spec; one written by an older version that no longer validates is shown as is."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError:
        return JobSpec.model_construct(**raw)


def dispatch_job(job_id: str) -> None:
    """Hand the committed job to the broker. Failure is logged, not raised: the job stays queued
    in the database and the workers' stale-job sweep dispatches it again."""
    try:
        dispatch(job_id)
    except Exception as exc:
        log.warning(
            "dispatch of job %s failed (the stale-job sweep will retry): %s",
            job_id,
            (str(exc).splitlines() or [type(exc).__name__])[0],
        )


# ------------------------------------------------------------------------------------------ submit


async def strict_spec(request: Request) -> None:
    """Validate the POST /jobs body in pydantic's strict JSON mode as well: JobSpec alone (lax)
    would turn `"seed": false` into 0 or `"n": "5"` into 5; a typed API should refuse those."""
    try:
        JobSpec.model_validate_json(await request.body(), strict=True)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
        ) from None


QUOTA_RETRY_AFTER_S = 30


def check_quota(session: Any, tenant: str, cap: int, idempotency_key: str | None) -> None:
    """429 problem "too-many-queued-jobs" (Retry-After) when the tenant already has `cap` queued jobs
    (settings.tenant_max_queued); a replay of an existing Idempotency-Key is never refused. Two
    concurrent submits may both pass at cap - 1: the cap is a guard against floods, not a ledger."""
    from store.jobs import count_queued, job_by_key

    queued = count_queued(session, tenant)
    if queued < cap or (idempotency_key is not None and job_by_key(session, tenant, idempotency_key)):
        return
    raise ApiProblem(
        429,
        "too-many-queued-jobs",
        f"this tenant already has {queued} queued jobs (limit {cap}, CARCERT_TENANT_MAX_QUEUED); "
        "submit more once some have started, or cancel some",
        title="Too Many Requests",
        headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        extra={"queued": queued, "max_queued": cap},
    )


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a job",
    responses={
        200: {
            "model": JobOut,
            "description": "Replay: this Idempotency-Key was already used with the "
            "same body; the existing job is returned",
        },
        202: {"description": "Accepted: the job is queued; Location points to it"},
        **problem_responses(400, 401, 409, 422, 429, 503),
    },
    dependencies=[Depends(strict_spec)],
)
def submit_job(
    spec: JobSpec,
    response: Response,
    background: BackgroundTasks,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
    ] = None,
) -> JobOut:
    from api.program_checks import check_program_job

    check_work(spec, settings.max_job_work)
    check_job_spec(session, tenant, spec, settings.data_roots, settings)
    check_webhook(spec, settings)
    check_quota(session, tenant, settings.tenant_max_queued, idempotency_key)
    check_program_job(session, store, tenant, spec)
    try:
        job, created = create_job(session, tenant, spec, idempotency_key)
    except IdempotencyConflict as exc:
        session.rollback()
        raise ApiProblem(
            409,
            "idempotency-conflict",
            "This Idempotency-Key was already used with a different request body "
            f"(job {exc.job_id}); use a new key for a new job.",
            title="Conflict",
        ) from None
    session.commit()
    response.headers["Location"] = f"/jobs/{job.id}"
    if created:
        background.add_task(dispatch_job, job.id)
    else:
        response.status_code = 200
    return job_out(job)


# ------------------------------------------------------------------------------------ list / get


def parse_label(raw: str) -> tuple[str, str]:
    """'key:value' -> (key, value); 422 problem when it has no ':' or the key is not a label key."""
    key, sep, value = raw.partition(":")
    if not sep or not LABEL_KEY.fullmatch(key) or len(value) > MAX_LABEL_VALUE:
        raise ApiProblem(
            422,
            "validation-error",
            f"label: {raw[:100]!r} is not key:value (key: 1..63 letters, digits, '.', '_', '-', '/'; "
            f"value up to {MAX_LABEL_VALUE} characters)",
            title="Invalid request",
        )
    return key, value


@router.get(
    "", response_model=JobPage, summary="List jobs, newest first", responses=problem_responses(401, 422, 503)
)
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    status: JobStatus | None = None,
    label: Annotated[
        list[str] | None,
        Query(max_length=MAX_LABELS, description="key:value; repeat for several (all must match)"),
    ] = None,
) -> JobPage:
    labels = [parse_label(x) for x in label or []]
    try:
        rows, next_cursor = repo_list(
            session, tenant, status=status, cursor=cursor, limit=limit, labels=labels
        )
    except InvalidCursor:
        raise ApiProblem(
            422, "validation-error", "cursor: not a cursor returned by GET /jobs", title="Invalid request"
        ) from None
    return JobPage(items=[job_out(j) for j in rows], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Job status, progress and results summary",
    responses=problem_responses(401, 404, 503),
)
def get_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:

    job = tenant_job(session, tenant, job_id)
    return job_out(job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description="A queued job is cancelled at once (200); a running job gets cancel_requested and stops "
    "cooperatively at its next check (202). Idempotent: an already cancelled job answers 200; a "
    "succeeded or failed job answers 409.",
    responses={
        202: {"model": JobOut, "description": "cancel requested"},
        **problem_responses(401, 404, 409, 503),
    },
)
def cancel_job(job_id: str, response: Response, tenant: TenantDep, session: SessionDep) -> JobOut:

    job = tenant_job(session, tenant, job_id)
    if job.status not in FINAL:
        job = request_cancel(session, tenant, job_id)
        session.commit()
        if job is None:
            raise job_not_found(job_id)
    if job.status in ("succeeded", "failed"):
        raise ApiProblem(
            409,
            "job-finished",
            f"job {job_id} already {job.status}; nothing to cancel",
            title="Conflict",
            extra={"job_status": job.status},
        )
    if job.status == "running":
        response.status_code = 202
    return job_out(job)


@router.get(
    "/{job_id}/logs",
    response_model=JobLogs,
    summary="The job's own log lines (claimed, stages, outcome, webhook), oldest first",
    responses=problem_responses(401, 404, 422, 503),
)
def get_logs(
    job_id: str,
    tenant: TenantDep,
    session: SessionDep,
    after: Annotated[
        int, Query(ge=0, le=2**31 - 1, description="only lines with seq above this (follow a running job)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> JobLogs:
    from store.joblogs import read_lines

    job = tenant_job(session, tenant, job_id)
    rows = read_lines(session, job.id, after=after, limit=limit)
    return JobLogs(
        job_id=job.id,
        lines=[LogLine(seq=r.seq, created_at=r.created_at, level=r.level, message=r.message) for r in rows],
    )


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a finished job",
    description="Deletes the job, its results, labels, log lines and the files it produced (model, mask, "
    "evidence); uploaded inputs stay. A queued or running job answers 409: cancel it first.",
    responses={204: {"description": "deleted"}, **problem_responses(401, 404, 409, 503)},
)
def delete_job(
    job_id: str, request: Request, tenant: TenantDep, session: SessionDep, store: StoreDep
) -> Response:
    from store.retention import delete_job as repo_delete
    from store.retention import remove_blobs

    job = tenant_job(session, tenant, job_id)
    if job.status not in FINAL:
        raise job_conflict(job, "job-active", f"cancel it first (POST /jobs/{job_id}/cancel), then delete it")
    keys = repo_delete(session, job)
    session.commit()
    request.app.state.cert_cache.clear()
    remove_blobs(store, keys)
    return Response(status_code=204)


# ---------------------------------------------------------------------------------- certificate


@dataclass(frozen=True)
class RenderedCertificate:
    tenant: str
    body: bytes
    etag: str


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN / +-inf float replaced by None: JSON has no such numbers, so a stored
    non-finite value (e.g. from a spec accepted before they were refused) must not make a read 500."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def render_certificate(results: list[Any]) -> bytes:
    """One result: its certificate document; several (a sweep): {"certificates": [...]}.
    Non-finite numbers are written as null (finite_json)."""
    with_cert = [r for r in results if r.certificate is not None]
    if len(with_cert) == 1 and len(results) == 1:
        doc: Any = with_cert[0].certificate
    else:
        doc = {
            "certificates": [
                {
                    "name": r.name,
                    "method": r.method,
                    "prune_ratio": r.prune_ratio,
                    "certificate": r.certificate,
                }
                for r in with_cert
            ]
        }
    return json.dumps(finite_json(doc), separators=(",", ":"), allow_nan=False).encode()


def _load_certificate(request: Request, tenant: str, job_id: str, variant: str | None) -> RenderedCertificate:

    with request.app.state.sessionmaker() as s:
        job = succeeded_job(s, tenant, job_id)
        results = select_variant(get_results(s, job.id), job_id, variant)
        if not any(r.certificate is not None for r in results):
            raise ApiProblem(404, "not-found", f"job {job_id} has no certificate", title="Not Found")
        body = render_certificate(results)
    return RenderedCertificate(tenant, body, '"' + hashlib.sha256(body).hexdigest() + '"')


CERT_DOC = {
    "description": 'The DESIGN.md certificate (one run), or {"certificates": [...]} for a sweep',
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"type": "object", "title": "Certificate", "additionalProperties": True},
                    {"$ref": "#/components/schemas/SweepCertificates"},
                ]
            }
        }
    },
}


@router.get(
    "/{job_id}/certificate",
    response_class=Response,
    summary="The job's certificate(s)",
    responses={
        200: CERT_DOC,
        304: {"description": "Not modified (If-None-Match)"},
        **problem_responses(401, 404, 409, 422, 503),
    },
)
async def get_certificate(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    variant: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """One run: the certificate; a sweep: {"certificates": [...]}, or one of them with ?variant=name."""
    cache: LruCache[RenderedCertificate] = request.app.state.cert_cache
    key = (job_id, variant)  # api.fastpath looks up (job_id, None)
    hit = cache.get(key)
    if hit is None:
        hit = await run_in_threadpool(_load_certificate, request, tenant, job_id, variant)
        cache.put(key, hit)
    elif hit.tenant != tenant:
        raise job_not_found(job_id)
    headers = {"ETag": hit.etag, "Cache-Control": CERT_CACHE_CONTROL}
    if request.headers.get("if-none-match") == hit.etag:
        return Response(status_code=304, headers=headers)
    return Response(hit.body, media_type="application/json", headers=headers)


# ---------------------------------------------------------------------------------- mask / model


def _result_file(
    session: Any, store: Any, tenant: str, job_id: str, variant: str | None, what: str, request: Request
) -> Response:

    job = succeeded_job(session, tenant, job_id)
    results = get_results(session, job.id)
    chosen = select_variant(results, job_id, variant)
    if len(chosen) != 1:
        raise ApiProblem(
            422,
            "variant-required",
            f"job {job_id} has several variants; pass ?variant= one of {', '.join(r.name for r in results)}",
            title="Invalid request",
        )
    result = chosen[0]
    art_id = {"mask": result.mask_artifact_id, "model": result.model_artifact_id,
              "evidence": result.evidence_artifact_id}.get(what)
    if what in ("pt2", "onnx") and result.model_artifact_id:  # exported on first request
        from api.model_formats import deployable_artifact_id

        art_id = deployable_artifact_id(request, session, tenant, job_id, result, what)
    art = get_artifact(session, tenant, art_id) if art_id else None
    if art is None:
        raise ApiProblem(
            404,
            "not-found",
            f"variant {result.name!r} of job {job_id} has no {what} file"
            + (" (an unpruned method has no mask)" if what == "mask" else "")
            + (" (a certify job has no model of its own)" if what in ("model", "pt2", "onnx") else ""),
            title="Not Found",
        )
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "X-Content-SHA256": art.sha256, "Cache-Control": "private, max-age=0"}
    if what == "evidence":  # the content hash the certificate names (carcert verify recomputes it)
        headers["X-Evidence-SHA256"] = str((result.certificate or {}).get("evidence_sha256", ""))
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        path = store.local_path(art.storage_key)
    except ArtifactMissing:
        log.error("job %s: blob of artifact %s (%s) is missing from the store", job_id, art.id, what)
        raise ApiProblem(
            500,
            "result-file-missing",
            f"the {what} file of this job is missing on the server",
            title="Internal Server Error",
        ) from None
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job_id}-{result.name}-" + FILE_SUFFIX.get(what, f"{what}.safetensors"),
        headers=headers,
    )


BINARY = {"schema": {"type": "string", "format": "binary"}}
FILE_DOC = {
    200: {
        "description": "safetensors file; ETag and X-Content-SHA256 carry its sha256",
        "content": {"application/octet-stream": BINARY},
    },
    304: {"description": "Not modified (If-None-Match)"},
}


@router.get(
    "/{job_id}/mask",
    response_class=Response,
    summary="Download the binary mask (safetensors)",
    responses={**FILE_DOC, **problem_responses(401, 404, 409, 422, 503)},
)
def get_mask(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    variant: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    return _result_file(session, store, tenant, job_id, variant, "mask", request)


@router.get(
    "/{job_id}/model",
    response_class=Response,
    summary="Download the pruned model: format=safetensors (weights), pt2 (torch.export program) or onnx",
    description="pt2 and onnx carry the preprocessing (input shape, channels, scaling) and the "
    "certificate's sha256 as metadata (pt2: the archive's extra file carcert.json; onnx: metadata_props); "
    "they are exported on the first request (seconds) and kept. A model.program job's pt2 is the pruned "
    "program the worker wrote (the certificate's pt2_sha256).",
    responses={**FILE_DOC, **problem_responses(401, 404, 409, 422, 503)},
)
def get_model(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    variant: Annotated[str | None, Query(max_length=100)] = None,
    format: Annotated[Literal["safetensors", "pt2", "onnx"], Query()] = "safetensors",  # noqa: A002
) -> Response:
    what = "model" if format == "safetensors" else format
    return _result_file(session, store, tenant, job_id, variant, what, request)


@router.get(
    "/{job_id}/evidence",
    response_class=Response,
    summary="Download the certificate's evidence (npz: z, deltas, p, labels, indices, draws)",
    responses={
        200: {
            "description": "npz file for `carcert verify --evidence`; ETag and X-Content-SHA256 carry the "
            "file's sha256, X-Evidence-SHA256 the certificate's evidence_sha256 (a hash of the arrays)",
            "content": {"application/octet-stream": BINARY},
        },
        304: {"description": "Not modified (If-None-Match)"},
        **problem_responses(401, 404, 409, 422, 503),
    },
)
def get_evidence(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    variant: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    return _result_file(session, store, tenant, job_id, variant, "evidence", request)
