"""POST /artifacts (streamed multipart upload, validated, then stored) and GET /artifacts/{id}."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.checks import check_uploaded_file
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiProblem
from api.schemas import UPLOAD_KINDS, ArtifactOut, problem_responses
from api.uploads import receive_upload

log = logging.getLogger("carcert.api")
router = APIRouter(prefix="/artifacts", tags=["artifacts"])


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "weights: .safetensors or a weights_only torch checkpoint",
                        },
                        "kind": {"type": "string", "enum": list(UPLOAD_KINDS), "default": "weights"},
                    },
                }
            }
        },
    }
}


def to_out(row) -> ArtifactOut:
    return ArtifactOut(
        id=row.id,
        kind=row.kind,
        filename=row.filename,
        sha256=row.sha256,
        size=row.size,
        created_at=row.created_at,
        ref=f"artifact:{row.id}",
    )


def _persist(request: Request, tenant: str, kind: str, filename: str, path: Path) -> ArtifactOut:
    """Validate the received file, store the blob, insert the row; the blob is removed if the row fails."""
    from store.artifacts import create_artifact

    check_uploaded_file(path, kind, filename)
    store = request.app.state.artifact_store
    key, digest, size = store.put_file(path)
    try:
        with request.app.state.sessionmaker() as s:
            row = create_artifact(s, tenant, kind, filename, digest, size, key)
            s.commit()
            return to_out(row)
    except BaseException:
        store.delete(key)
        raise


@router.post(
    "",
    status_code=201,
    response_model=ArtifactOut,
    summary="Upload a file (weights, dataset, generator)",
    openapi_extra=UPLOAD_BODY,
    responses=problem_responses(400, 401, 413, 415, 422, 503),
)
async def upload_artifact(
    request: Request, response: Response, tenant: TenantDep, settings: SettingsDep
) -> ArtifactOut:
    tmp_dir = Path(request.app.state.artifact_store.root) / ".incoming"
    upload = await receive_upload(request, tmp_dir, settings.max_upload_bytes)
    try:
        kind = upload.fields.get("kind", "weights").strip() or "weights"
        if kind not in UPLOAD_KINDS:
            raise ApiProblem(
                422,
                "invalid-input",
                f"kind must be one of {', '.join(UPLOAD_KINDS)}, not {kind!r}",
                title="Invalid input",
            )
        if upload.size == 0:
            raise ApiProblem(422, "invalid-input", "the uploaded file is empty", title="Invalid input")
        out = await run_in_threadpool(_persist, request, tenant, kind, upload.filename, upload.path)
    finally:
        upload.discard()
    response.headers["Location"] = f"/artifacts/{out.id}"
    return out


@router.get(
    "/{artifact_id}",
    response_model=ArtifactOut,
    summary="Artifact metadata",
    responses=problem_responses(401, 404, 503),
)
def get_artifact_meta(artifact_id: str, tenant: TenantDep, session: SessionDep) -> ArtifactOut:
    from store.artifacts import get_artifact

    row = get_artifact(session, tenant, artifact_id)
    if row is None:
        raise ApiProblem(404, "not-found", f"artifact {artifact_id!r} not found", title="Not Found")
    return to_out(row)
