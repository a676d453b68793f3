"""GET /jobs/{id}/model?format=pt2|onnx: the deployable copies (core.deploy) of a variant's model,
made on the first request and kept as artifacts of the tenant.

Contract: `deployable_artifact_id(request, session, tenant, job_id, result, fmt)` returns the id
of the artifact holding the variant's model in `fmt`. A model.program job's pt2 is the pruned
program the worker stored (its sha256 is the certificate's pt2_sha256). Otherwise the file is
exported once from model.safetensors (or the stored program, for ONNX), stored as kind "model",
and its id recorded in the result's metrics as "<fmt>_artifact_id" (the first writer wins; a
concurrent duplicate is deleted again). One export at a time per process: exports take seconds
and all the CPU they get. Export failures are 422 problem "export-failed" with the reason."""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.errors import ApiProblem
from store.artifacts import get_artifact

log = logging.getLogger("carcert.api")
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Variant:
    """What the export needs of a result row, read before the request's transaction ends."""

    id: str
    name: str
    metrics: dict[str, Any]
    certificate: dict[str, Any] | None
    model_artifact_id: str | None


def _export(request: Any, tenant: str, job_id: str, result: _Variant, fmt: str) -> str:
    """Export, store and record the file (module docstring); its artifact id."""
    from core.deploy import export_deployable
    from core.errors import InvalidInput
    from store.artifacts import store_artifact
    from store.jobs import link_result_file

    store, metrics = request.app.state.artifact_store, dict(result.metrics or {})
    program_id = metrics.get("program_artifact_id")
    with request.app.state.sessionmaker() as s:
        model_art = get_artifact(s, tenant, result.model_artifact_id) if result.model_artifact_id else None
        program_art = get_artifact(s, tenant, program_id) if program_id else None
    if model_art is None:
        raise ApiProblem(
            404, "not-found", f"variant {result.name!r} of job {job_id} has no model file", title="Not Found"
        )
    tmp_root = Path(store.root) / ".incoming"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        out = Path(tmp) / f"model.{fmt}"
        try:
            export_deployable(
                fmt,
                out,
                weights=store.local_path(model_art.storage_key),
                metrics=metrics,
                certificate=result.certificate,
                program=store.local_path(program_art.storage_key) if program_art else None,
            )
        except InvalidInput as exc:
            raise ApiProblem(422, "export-failed", str(exc), title="Cannot export the model") from None
        with request.app.state.sessionmaker() as s:
            art = store_artifact(s, tenant, "model", f"{job_id}-{result.name}-model.{fmt}", out, store=store)
            winner = link_result_file(s, result.id, f"{fmt}_artifact_id", art.id)
            s.commit()
    if winner != art.id:  # another API process exported it first
        with request.app.state.sessionmaker() as s:
            row = get_artifact(s, tenant, art.id)
            if row is not None:
                s.delete(row)
                s.commit()
        store.delete(art.storage_key)
    log.info("job %s: exported variant %s as %s (artifact %s)", job_id, result.name, fmt, winner)
    return winner


def deployable_artifact_id(
    request: Any, session: Any, tenant: str, job_id: str, result: Any, fmt: str
) -> str:
    """The artifact id of the variant's model in `fmt` ("pt2" or "onnx"), exported if needed."""
    metrics = dict(result.metrics or {})
    if fmt == "pt2" and metrics.get("program_artifact_id"):
        return str(metrics["program_artifact_id"])
    key = f"{fmt}_artifact_id"
    if metrics.get(key) and get_artifact(session, tenant, metrics[key]) is not None:
        return str(metrics[key])
    variant = _Variant(result.id, result.name, metrics, result.certificate, result.model_artifact_id)
    session.rollback()  # no transaction held open during the export
    with _EXPORT_LOCK:
        with request.app.state.sessionmaker() as s:
            from store.models import JobResult

            row = s.get(JobResult, result.id)
            done = (row.metrics or {}).get(key) if row is not None else None
            if done and get_artifact(s, tenant, done) is not None:
                return str(done)
        return _export(request, tenant, job_id, variant, fmt)
