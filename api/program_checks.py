"""Checks for user programs (model.program, a torch.export .pt2 uploaded as kind "model"), kept
apart from api.checks: the upload check loads the program safely (core.program.read_program, no
unpickling with code execution) and refuses what cannot be pruned; the job check refuses a program
whose input shape does not fit a named dataset, before anything is queued."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from api.errors import ApiProblem
from core.spec import JobSpec

# (C, H, W) of the named datasets (core.data); other datasets are checked by the worker.
NAMED_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28)}


def _invalid(detail: str, field: str) -> ApiProblem:
    err = {"loc": ["body", *field.split(".")], "field": field, "msg": detail, "type": "invalid_program"}
    return ApiProblem(422, "invalid-input", detail, title="Invalid input", extra={"errors": [err]})


def is_program_archive(path: Path) -> bool:
    """A zip whose entries include torch.export's `archive_format` marker (a .pt2)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "archive_format" or n.endswith("/archive_format") for n in zf.namelist())


def describe_program_file(path: Path, field: str = "file") -> dict[str, Any]:
    """core.program.describe_program of the file; 422 naming the reason when it is not a program
    that can be pruned."""
    from core.errors import InvalidInput
    from core.program import describe_program, read_program

    try:
        return describe_program(read_program(path))
    except InvalidInput as exc:
        raise _invalid(f"not a prunable torch.export program: {exc}", field) from None


def check_program_upload(path: Path, filename: str) -> bool:
    """True when the kind-"model" upload is a program (and it was checked); False for weights."""
    if not (is_program_archive(path) or filename.lower().endswith(".pt2")):
        return False
    describe_program_file(path)
    return True


def check_program_job(session: Session, store: Any, tenant: str, spec: JobSpec) -> None:
    """model.program must be a .pt2 artifact; for a named dataset its input shape must fit."""
    ref = spec.model.program
    if ref is None or not ref.startswith("artifact:"):
        return
    from store.artifacts import get_artifact

    art = get_artifact(session, tenant, ref.split(":", 1)[1])
    if art is None:
        return  # api.checks reports the missing artifact
    if not art.filename.lower().endswith(".pt2"):
        raise _invalid(
            f"model.program: artifact {art.id!r} ({art.filename}) is not a .pt2 program", "model.program"
        )
    want = NAMED_SHAPES.get(spec.dataset)
    if want is None:
        return
    shape = describe_program_file(store.local_path(art.storage_key), "model.program")["input_shape"]
    if any(s is not None and s != w for s, w in zip(shape, want, strict=True)):
        got = tuple("dynamic" if s is None else s for s in shape)
        raise _invalid(
            f"model.program takes inputs of shape (C, H, W) = {got}, dataset {spec.dataset!r} has {want}",
            "model.program",
        )
