"""Input checks the API does before it keeps anything: uploaded files (weights must be a valid
safetensors file or a torch checkpoint loadable with `weights_only=True`, every floating-point
tensor finite; pickled code is never executed) and the references inside a JobSpec (artifacts of
the caller's tenant only, server paths (datasets, or weights given as paths) only inside
`settings.data_roots`, known transform names)."""

from __future__ import annotations

import json
import pickletools
import re
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from api.errors import ApiProblem
from core.errors import DatasetError
from core.objectstore import is_s3_url
from core.paths import within_roots
from core.spec import JobSpec
from store.artifacts import artifact_kind
from store.objects import check_dataset_url
from store.settings import Settings

ARTIFACT_PREFIX = "artifact:"
WEIGHT_KINDS = ("weights", "model")
REF_KINDS: dict[str, tuple[str, ...]] = {
    "model.weights": WEIGHT_KINDS,
    "model.program": ("model",),  # a torch.export .pt2 (api.program_checks)
    "mask": ("mask",),
    "dataset": ("dataset",),
    "transform.encoder": ("generator", *WEIGHT_KINDS),
    "transform.decoder": ("generator", *WEIGHT_KINDS),
}
PATH_DATASETS = ("npz", "imagefolder", "fashion-mnist")
NAMED_DATASETS = ("digits", "fashion-mnist")


def _invalid(detail: str, field: str | None = None) -> ApiProblem:
    extra = (
        {
            "errors": [
                {
                    "loc": ["body", *field.split(".")],
                    "field": field,
                    "msg": detail,
                    "type": "invalid_reference",
                }
            ]
        }
        if field
        else None
    )
    return ApiProblem(422, "invalid-input", detail, title="Invalid input", extra=extra)


# ---------------------------------------------------------------------------- uploaded files


def _check_safetensors(path: Path) -> None:
    """Header = 8-byte little-endian length + JSON {name: {dtype, shape, data_offsets}}; the byte
    ranges must tile the data section exactly (as the safetensors spec requires)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100_000_000):
            raise _invalid("not a valid safetensors file: header length exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _invalid("not a valid safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise _invalid("not a valid safetensors file: the header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            _ = info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise _invalid(f"not a valid safetensors file: bad entry for tensor {name!r}") from None
        spans.append((start, end))
    if not spans:
        raise _invalid("the safetensors file holds no tensors")
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos or end < start:
            raise _invalid("not a valid safetensors file: tensor byte ranges overlap or leave gaps")
        pos = end
    if pos != size - 8 - n:
        raise _invalid("not a valid safetensors file: truncated or trailing data")
    try:  # the reference parser must agree (dtype names, shapes x dtype size == byte ranges)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as sf:
            non_finite = [k for k in sf.keys() if not _finite(sf.get_tensor(k))]  # noqa: SIM118
    except Exception as exc:
        raise _invalid(f"not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    _refuse_non_finite(non_finite)


def _finite(t) -> bool:
    """False for a floating-point tensor holding NaN or +-inf (other dtypes are always finite)."""
    import torch

    return not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())


def _refuse_non_finite(names: Sequence[str]) -> None:
    if names:
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise _invalid(f"the weights hold NaN or inf values in: {', '.join(names[:10])}{more}")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


TORCH_BOILERPLATE = ("weights only load failed", "weights_only", "re-running", "please file", "check the doc")
GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
SAFE_PICKLE_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy.core.multiarray")


def _pickle_globals(path: Path) -> list[str]:
    """'module.name' of every global the pickle (the file, or data.pkl of a torch zip) imports,
    read with pickletools (opcodes only; nothing is executed). Empty when it cannot be parsed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            data = path.read_bytes()[:50_000_000]
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:
        return []


def _torch_reason(exc: Exception, path: Path | None = None) -> str:
    """Why torch's restricted unpickler refused the file, without its boilerplate (which suggests
    weights_only=False): the refused global ('refused global posix.system') when there is one."""
    text = str(exc)
    m = GLOBAL_IN_MESSAGE.search(text)
    if m:
        return f"refused global {m.group(1)}"
    unsafe = [g for g in (_pickle_globals(path) if path else []) if not g.startswith(SAFE_PICKLE_MODULES)]
    if unsafe:
        return f"refused global {unsafe[0]}"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.lower().startswith(TORCH_BOILERPLATE)]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _check_torch_checkpoint(path: Path) -> None:
    """torch.load(weights_only=True): the restricted unpickler refuses any global that is not a
    tensor/container type, so code inside the pickle is never run."""
    from core.models import non_tensor_keys, torch_load_safely, unwrap_state_dict  # torch: on first use

    try:
        obj = torch_load_safely(path)
    except Exception as exc:
        raise _invalid(
            "the weights file is neither safetensors nor a checkpoint loadable with "
            f"torch.load(weights_only=True) (pickled code is refused): {_torch_reason(exc, path)}"
        ) from None
    obj = unwrap_state_dict(obj)
    if obj is None:
        raise _invalid("the checkpoint does not hold a state_dict (a non-empty mapping name -> tensor)")
    bad = non_tensor_keys(obj)
    if bad:
        raise _invalid(f"checkpoint entries that are not tensors: {', '.join(bad[:10])}")
    _refuse_non_finite([str(k) for k, v in obj.items() if not _finite(v)])


def _check_npz(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            for key in z.files:  # reads every header; object arrays raise without allow_pickle
                z[key]
    except Exception as exc:
        raise _invalid(f"not a readable .npz without pickles: {str(exc).splitlines()[0][:300]}") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - names
    if missing:
        raise _invalid(f"the .npz dataset lacks the arrays {', '.join(sorted(missing))}")


def check_uploaded_file(path: Path, kind: str, filename: str) -> None:
    """Raise 422 (ApiProblem) when the file cannot be used safely as `kind`."""
    from api.program_checks import check_program_upload

    if kind == "model" and check_program_upload(path, filename):
        return
    if kind in ("weights", "model", "mask", "generator"):
        if _is_safetensors(path):
            _check_safetensors(path)
        else:
            _check_torch_checkpoint(path)
    elif kind == "dataset" and (filename.endswith(".npz") or _is_npz(path)):
        _check_npz(path)


def _is_npz(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return bool(names) and all(n.endswith(".npy") for n in names)


# ---------------------------------------------------------------------------- job references


def _file_ref(session: Session, tenant: str, field: str, ref: str, data_roots: Sequence[Path]) -> None:
    """'artifact:<id>' of the tenant with a fitting kind, or a server path inside the data roots."""
    if ref.startswith(ARTIFACT_PREFIX):
        _artifact_ref(session, tenant, field, ref)
    else:
        check_path(ref, data_roots, field)


def _artifact_ref(session: Session, tenant: str, field: str, ref: str) -> None:
    art_id = ref[len(ARTIFACT_PREFIX) :]
    kind = artifact_kind(session, tenant, art_id)
    if kind is None:
        raise _invalid(f"{field}: artifact {art_id!r} not found", field)
    if kind not in REF_KINDS[field]:
        raise _invalid(
            f"{field}: artifact {art_id!r} has kind {kind!r}; expected one of {', '.join(REF_KINDS[field])}",
            field,
        )


def check_path(raw: str, data_roots: Sequence[Path], field: str = "dataset") -> Path:
    """The resolved path if it lies inside one of `data_roots` (symlinks and '..' resolved first)
    and exists; else 422. Upload files with POST /artifacts to use them from anywhere."""
    try:
        path = Path(raw).expanduser().resolve()
        if within_roots(path, data_roots):
            if not path.exists():
                raise _invalid(f"{field}: path {raw!r} does not exist", field)
            return path
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, symlink loop, NUL byte
        raise _invalid(f"{field}: path {raw!r} cannot be used: {type(exc).__name__}", field) from None
    roots = ", ".join(str(Path(r)) for r in data_roots) or "(none configured)"
    raise _invalid(
        f"{field}: path {raw!r} is outside the allowed data roots ({roots}); upload the file "
        "with POST /artifacts and use 'artifact:<id>'",
        field,
    )


def _check_dataset(
    session: Session, tenant: str, ref: str, data_roots: Sequence[Path], settings: Settings | None
) -> None:
    if ref in NAMED_DATASETS:
        return
    prefix, sep, rest = ref.partition(":")
    if sep and prefix == "artifact":
        _artifact_ref(session, tenant, "dataset", ref)
    elif sep and prefix == "imagefolder" and is_s3_url(rest):
        try:
            check_dataset_url(rest, settings or Settings(artifact_backend="local"))
        except DatasetError as exc:
            raise _invalid(f"dataset: {exc}", "dataset") from None
    elif sep and prefix in PATH_DATASETS and rest:
        check_path(rest, data_roots)
    else:
        raise _invalid(
            f"unknown dataset reference {ref!r}; use digits, fashion-mnist[:DIR], "
            "npz:PATH, imagefolder:PATH, imagefolder:s3://BUCKET/PREFIX or artifact:ID",
            "dataset",
        )


def _parametric_names() -> Sequence[str]:
    from core.transforms import PARAMETRIC  # torch: loaded on the first check (api.main warms it up)

    return tuple(PARAMETRIC)


def check_work(spec: JobSpec, cap: int) -> int:
    """The job's estimated work (core.work.estimate_work); 422 naming the estimate and the cap when
    it exceeds `cap` (settings.max_job_work)."""
    from core.work import estimate_work

    work = estimate_work(spec)
    if work > cap:
        raise ApiProblem(
            422,
            "job-too-large",
            f"the job's estimated work is {work:.3g} forward/backward passes of one image, over this "
            f"server's cap of {cap:.3g} (CARCERT_MAX_JOB_WORK); use fewer epochs, variants, "
            "certification samples or n x l, or a train_subset",
            title="Job too large",
            extra={"estimated_work": work, "max_job_work": cap},
        )
    return work


def check_job_spec(
    session: Session, tenant: str, spec: JobSpec, data_roots: Sequence[Path], settings: Settings | None = None
) -> None:
    """Raise 422 for any reference in `spec` the tenant may not or cannot use (s3:// datasets only
    inside `settings`' dataset folder of the artifact bucket, store.objects)."""
    if spec.model.weights is not None:
        _file_ref(session, tenant, "model.weights", spec.model.weights, data_roots)
    if spec.model.program is not None:
        _file_ref(session, tenant, "model.program", spec.model.program, data_roots)
    if spec.mask is not None:
        _file_ref(session, tenant, "mask", spec.mask, data_roots)
    for name in ("encoder", "decoder"):
        ref = getattr(spec.transform, name)
        if ref is not None:
            _file_ref(session, tenant, f"transform.{name}", ref, data_roots)
    _check_dataset(session, tenant, spec.dataset, data_roots, settings)
    if spec.transform.kind == "parametric":
        names = _parametric_names()
        unknown = [p for p in spec.transform.name.split("+") if p.strip() not in names]
        if unknown:
            raise _invalid(
                f"unknown parametric transform {', '.join(map(repr, unknown))}; valid "
                f"names: {', '.join(names)} (or compositions such as 'brightness+blur')",
                "transform.name",
            )


def check_webhook(spec: JobSpec, settings: Settings) -> None:
    """422 problem "webhook-refused" when the webhook's host does not resolve or resolves to a
    non-public address that CARCERT_WEBHOOK_ALLOWED_HOSTS does not allow (worker.webhooks)."""
    if spec.webhook is None:
        return
    from worker.webhook_guard import WebhookRefused, check_webhook_url

    try:
        check_webhook_url(spec.webhook.url, settings)
    except WebhookRefused as exc:
        raise ApiProblem(
            422,
            "webhook-refused",
            str(exc),
            title="Invalid input",
            extra={
                "errors": [{"loc": ["body", "webhook", "url"], "msg": str(exc), "type": "webhook_refused"}]
            },
        ) from None
