"""Response models of the REST API (request bodies: core.spec.JobSpec and a multipart upload).

These are declared in OpenAPI; the big certificate document is returned as pre-rendered bytes
(see routers/jobs.py) and described here only for the docs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.spec import JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ArtifactKind = Literal["weights", "dataset", "generator", "model", "mask", "evidence", "report", "other"]
UPLOAD_KINDS: tuple[str, ...] = ("weights", "model", "mask", "dataset", "generator", "other")


class Problem(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str = Field(examples=["urn:carcert:problem:validation-error"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(default=None, description="field errors (422 only)")


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: ArtifactKind
    filename: str
    sha256: str
    size: int
    created_at: datetime
    ref: str = Field(description="the reference to use in a job spec: 'artifact:<id>'")


class JobError(BaseModel):
    title: str
    detail: str | None = None


class WebhookDelivery(BaseModel):
    """How the completion webhook went (worker.webhooks): state pending (the job has not ended, or
    the event is about to go), sending, delivered or failed (every attempt failed)."""

    state: Literal["pending", "sending", "delivered", "failed"]
    attempts: int = 0
    status_code: int | None = Field(default=None, description="HTTP status of the last attempt")
    error: str | None = Field(default=None, description="why the last attempt failed")
    last_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


class UnitOut(BaseModel):
    """One variant of a sweep spread over workers: its own status and progress."""

    name: str = Field(description="the variant (method-ratio), as in the certificate's name")
    status: JobStatus
    stage: str | None = None
    progress: float = Field(ge=0.0, le=1.0)
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobOut(BaseModel):
    id: str
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    kind: str
    status: JobStatus
    stage: str | None = None
    progress: float = Field(ge=0.0, le=1.0)
    cancel_requested: bool = False
    attempts: int = 0
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    summary: dict[str, Any] | None = Field(default=None, description="results summary (variants)")
    spec: JobSpec
    links: dict[str, str] = Field(default_factory=dict)
    webhook: WebhookDelivery | None = Field(default=None, description="completion webhook delivery")
    units: list[UnitOut] = Field(
        default_factory=list,
        description="a sweep spread over workers: each variant's status and progress (else empty)",
    )


class LogLine(BaseModel):
    seq: int = Field(description="the line's number within the job (1, 2, ...)")
    created_at: datetime
    level: str
    message: str


class JobLogs(BaseModel):
    job_id: str
    lines: list[LogLine]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page")


class CertificateEntry(BaseModel):
    name: str
    method: str | None = None
    prune_ratio: float | None = None
    certificate: dict[str, Any]


class SweepCertificates(BaseModel):
    certificates: list[CertificateEntry]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error codes (api.main declares them as problem+json)."""
    return {c: {"model": Problem, "description": "Problem details (application/problem+json)"} for c in codes}
