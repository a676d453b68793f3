"""What `carcert verify` checks beyond core.certify.verify_certificate (the evidence).

- check_files: the model (and mask) files hash to the certificate's model.sha256 / mask_sha256,
  and the certificate's model entry (params, nonzero, sparsity, per-layer sparsity) is what those
  files hold: nonzero (w * m) over every conv / linear weight (the state-dict tensors named
  "*.weight" with 2 or 4 dimensions, which is exactly core.masking.prunable_weights for the
  supported architectures).
- recompute: re-runs the model on the dataset's test samples and the recorded deltas and compares
  p and Z with the evidence. Only this ties the evidence to the model: the evidence alone is
  consistent with any model that would have produced it. The forwards run at the certificate's
  params.precision (fp32 or bf16) and, when its software.forward records one, in the same form
  (compiled or not; core.fastforward). Tolerance RECOMPUTE_ATOL[precision] (absolute, on
  probabilities): float32 forward passes differ across CPUs, GPUs, thread counts, batch sizes and
  forms by about 1e-7; bf16 ones by up to ~1e-3 across forms and machines (8-bit mantissa).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InvalidInput
from core.objectstore import ObjectStore

RECOMPUTE_ATOL = {"fp32": 1e-6, "bf16": 1e-2}
MODEL_FILE, MASK_FILE = "model.safetensors", "mask.safetensors"


def _read_cert(cert_path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(cert_path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read certificate {cert_path}: {exc}") from exc


def model_entry_of(weights: Path, mask: Path | None) -> dict[str, Any]:
    """params / nonzero / sparsity / layers of the weights file (times the mask), computed like
    core.masking.sparsity_report."""
    from core.masking import load_masks
    from core.models import _read_state_dict

    state = _read_state_dict(Path(weights))
    masks = load_masks(mask) if mask is not None else {}
    layers, total, nonzero = [], 0, 0
    for name, w in state.items():
        if not name.endswith(".weight") or w.ndim not in (2, 4):
            continue
        nz = w != 0
        if name in masks:
            nz = nz & masks[name].to(torch.bool)
        n, k = w.numel(), int(nz.count_nonzero())
        total, nonzero = total + n, nonzero + k
        layers.append({"name": name, "sparsity": 1.0 - k / max(1, n)})
    return {"params": total, "nonzero": nonzero, "sparsity": 1.0 - nonzero / max(1, total), "layers": layers}


def _locate(cert_path: Path, given: Path | None, default_name: str) -> Path | None:
    if given is not None:
        return Path(given)
    beside = Path(cert_path).with_name(default_name)
    return beside if beside.is_file() else None


def check_files(cert_path: Path, model: Path | None = None, mask: Path | None = None) -> list[str]:
    """Mismatches between the certificate and its model / mask files ([] when they agree). The files
    are `model` / `mask` if given, else model.safetensors / mask.safetensors beside the certificate."""
    from core.models import file_sha256

    cert = _read_cert(cert_path)
    info = cert.get("model") or {}
    want_mask = cert.get("mask_sha256")
    model_path = _locate(cert_path, model, MODEL_FILE)
    mask_path = _locate(cert_path, mask, MASK_FILE) if (want_mask or mask) else None
    if model_path is None:
        return [f"no {MODEL_FILE} beside the certificate: pass --model (or --no-files)"]
    if not model_path.is_file():
        return [f"model file not found: {model_path}"]
    bad = []
    got = file_sha256(model_path)
    if got != info.get("sha256"):
        bad.append(f"model.sha256 {info.get('sha256')!r} != sha256 of {model_path} {got}")
    if want_mask is None and mask_path is not None:
        bad.append(f"the certificate names no mask but {mask_path} was given")
    elif want_mask is not None:
        if mask_path is None or not mask_path.is_file():
            return [*bad, f"the certificate names mask {want_mask} but no mask file was found: pass --mask"]
        got = file_sha256(mask_path)
        if got != want_mask:
            bad.append(f"mask_sha256 {want_mask} != sha256 of {mask_path} {got}")
    entry = model_entry_of(model_path, mask_path if want_mask is not None else None)
    for key in ("params", "nonzero", "sparsity", "layers"):
        claimed = info.get(key)
        want = entry[key]
        if key == "layers" and isinstance(claimed, list):  # file order is not model order: by name
            claimed = sorted(({"name": e.get("name"), "sparsity": e.get("sparsity")} for e in claimed),
                             key=lambda e: str(e["name"]))
            want = sorted(want, key=lambda e: e["name"])
        if claimed != want:
            shown = "per-layer sparsity" if key == "layers" else f"{claimed!r} != {want!r} in the files"
            bad.append(f"model.{key} does not match the files: {shown}")
    return bad


def _rebuild(cert: dict[str, Any], model_path: Path, mask_path: Path | None, data: Any) -> torch.nn.Module:
    from core.masking import apply_masks_, load_masks
    from core.models import build_model, default_small_input, load_weights
    from core.preprocess import attach_normalize, normalize_for

    info = cert.get("model") or {}
    small = info.get("small_input")
    if small is None:
        small = default_small_input(*data.test_x.shape[2:])
    model = build_model(str(info.get("arch")), int(info.get("num_classes") or data.num_classes),
                        int(info.get("in_channels") or data.in_channels), small_input=bool(small))
    load_weights(model, model_path)
    if mask_path is not None:
        apply_masks_(model, load_masks(mask_path))
    return attach_normalize(model, normalize_for(_preprocess_spec(cert), data.in_channels)).eval()


def _preprocess_spec(cert: dict[str, Any]) -> Any:
    """The certificate's model.preprocess as a core.spec.PreprocessSpec (empty when absent)."""
    from core.spec import PreprocessSpec

    return PreprocessSpec(**((cert.get("model") or {}).get("preprocess") or {}))


def _transform_spec(desc: dict[str, Any]) -> Any:
    from core.spec import TransformSpec

    kind = desc.get("kind")
    if kind == "parametric":
        return TransformSpec(kind="parametric", name=desc["name"], strength=desc["strength"])
    if kind == "latent" and desc.get("generator") == "pca":
        return TransformSpec(kind="latent", component=desc["component"], strength=desc["strength"])
    if kind == "precomputed":
        return TransformSpec(kind="precomputed")
    raise InvalidInput(f"--recompute cannot rebuild the transformation {desc.get('kind')!r}/"
                       f"{desc.get('generator')!r} (exported latent generators are not supported)")


def recompute(cert_path: Path, evidence_path: Path | None = None, *, model: Path | None = None,
              mask: Path | None = None, dataset: str | None = None, device: str = "cpu",
              batch_size: int = 500, objects: ObjectStore | None = None) -> list[str]:
    """Re-run the model on the certificate's test samples and recorded deltas; mismatches of the
    dataset, the transformation, p or Z beyond RECOMPUTE_ATOL ([] when all agree). `dataset`
    overrides the certificate's reference (e.g. a local copy of a service artifact); `objects`
    reads an imagefolder:s3:// one. Runs at the certificate's precision and recorded form (module
    docstring)."""
    from core.certify import clean_probabilities, evidence_path_for, load_evidence, transformed_z
    from core.data import SPLIT_SEED, load_dataset
    from core.datasets import forward_batch
    from core.fastforward import PRECISIONS, prepare_forward
    from core.transforms import build_transform, transform_description

    cert = _read_cert(cert_path)
    precision = (cert.get("params") or {}).get("precision", "fp32")
    if precision not in PRECISIONS:
        return [f"unknown params.precision {precision!r} (one of {PRECISIONS})"]
    atol = RECOMPUTE_ATOL[precision]
    ev = load_evidence(Path(evidence_path) if evidence_path else evidence_path_for(Path(cert_path)))
    ds = cert.get("dataset") or {}
    split_seed = ds.get("split_seed")
    pre = _preprocess_spec(cert)
    data = load_dataset(dataset or ds.get("ref", ""), seed=int(cert["params"]["seed"]),
                        train_subset=ds.get("train_subset"),
                        split_seed=SPLIT_SEED if split_seed is None else int(split_seed),
                        resize=pre.resize, crop=pre.crop, objects=objects)
    if data.sha256 != ds.get("sha256"):
        return [f"dataset sha256 {data.sha256} != the certificate's {ds.get('sha256')}: not the same data"]
    transform = build_transform(_transform_spec(cert.get("transform") or {}), data=data, split="test")
    if transform_description(transform) != cert.get("transform"):
        return ["the rebuilt transformation's description differs from the certificate's"]
    model_path = _locate(cert_path, model, MODEL_FILE)
    if model_path is None:
        return [f"no {MODEL_FILE} beside the certificate: pass --model"]
    mask_path = _locate(cert_path, mask, MASK_FILE) if cert.get("mask_sha256") else None
    net = _rebuild(cert, model_path, mask_path, data).to(device)
    idx = torch.from_numpy(ev["indices"].astype(np.int64))
    xs = data.test_x.index_select(0, idx).to(device, torch.float32)
    batch_size = forward_batch(batch_size, xs.shape[1:])
    z, deltas = ev["z"].reshape(len(idx), -1), ev["deltas"].reshape(len(idx), -1)
    draws = ev.get("draws", np.full(len(idx), z.shape[1]))
    ran = (cert.get("software") or {}).get("forward") or {}
    fwd = prepare_forward(net, tuple(xs.shape[1:]), batch_size, device=device, precision=precision,
                          work=len(idx) + int(np.sum(draws)),
                          compile=(ran.get("form") == "compiled") if ran else None)
    p = clean_probabilities(fwd, xs, batch_size)
    bad = []
    dp = float(np.abs(p.cpu().numpy() - ev["p"]).max())
    if not dp <= atol:
        bad.append(f"clean probabilities differ from the evidence by {dp:.3g} > {atol:g} ({precision})")
    ids = torch.cat([torch.full((int(m),), k, dtype=torch.int64) for k, m in enumerate(draws)])
    flat = torch.from_numpy(np.concatenate([deltas[k, :int(m)] for k, m in enumerate(draws)]))
    if flat.numel():
        got = transformed_z(fwd, transform, xs, p, ids, flat, batch_size)
        want = np.concatenate([z[k, :int(m)] for k, m in enumerate(draws)])
        dz = float(np.abs(got - want).max())
        if not dz <= atol:
            k = int(ids[int(np.argmax(np.abs(got - want)))])
            bad.append(f"Z differs from the evidence by {dz:.3g} > {atol:g} ({precision}, worst: sample {k})")
    return bad


__all__ = ["RECOMPUTE_ATOL", "check_files", "model_entry_of", "recompute"]
