"""Deployable copies of a pruned model: a torch.export program (.pt2) and an ONNX graph (.onnx).

Contract:
- `deploy_metadata(metrics, certificate)` -> {str: str}: what a consumer needs to feed the model and
  to tie it to its certificate, in words and numbers: input layout NCHW float32, channels, height x
  width, scaling to [0, 1] (8-bit pixels / 255; scikit-learn digits / 16), no mean/std
  normalisation, logits output, class count, arch / method / prune ratio / sparsity, the sha256 of
  model.safetensors and `certificate_sha256` (sha256 of core.certify.certificate_body, UTF-8).
  Keys start with "carcert.".
- `export_deployable(fmt, out, weights=..., metrics=..., certificate=..., program=None)` writes
  `out` and returns its sha256. The network is model.safetensors loaded into the built-in
  architecture named in its metadata, or, for a model.program job, the pruned program model.pt2.
  fmt "pt2": torch.export program, batch dimension dynamic, metadata in the archive's extra file
  `carcert.json` (`torch.export.load(p, extra_files={"carcert.json": ""})`); runs with
  `torch.export.load(p).module()` and torch alone. fmt "onnx": the same program converted by
  torch.onnx (dynamo exporter), input "input" (batch, C, H, W), output "logits", metadata in the
  model's metadata_props; runs with onnxruntime alone.
- Export failures raise ExportError (an InvalidInput: the network cannot be expressed in that format).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import InvalidInput
from core.models import build_model, file_sha256, load_weights, weights_metadata

FORMATS = ("safetensors", "pt2", "onnx")
METADATA_FILE = "carcert.json"  # the pt2 archive's extra file holding deploy_metadata
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(InvalidInput):
    """The pruned network cannot be exported to the requested format (the reason is in the message)."""


def certificate_sha256(certificate: dict[str, Any]) -> str:
    """sha256 of the certificate's canonical body (core.certify.certificate_body, UTF-8): equal for
    equal certificates, whatever their created_at / job_id."""
    from core.certify import certificate_body

    return hashlib.sha256(certificate_body(certificate).encode()).hexdigest()


def _scaling(dataset_ref: str) -> str:
    if dataset_ref.split(":", 1)[0] == "digits":
        return (
            "float32 in [0, 1]: scikit-learn digits values (0..16) divided by 16; no mean/std normalisation"
        )
    text = "float32 in [0, 1]: 8-bit pixel values divided by 255 (float images used as given); "
    text += "no mean/std normalisation"
    if dataset_ref.startswith("imagefolder:"):
        text += "; images resized (bilinear) to the input size"
    return text


def deploy_metadata(metrics: dict[str, Any], certificate: dict[str, Any] | None) -> dict[str, str]:
    """The preprocessing contract and provenance of a variant (module docstring)."""
    dataset = metrics.get("dataset") or {}
    c, h, w = (int(v) for v in dataset.get("shape") or (metrics["in_channels"], 0, 0))
    channels = {1: "1 (grayscale)", 3: "3 (RGB)"}.get(c, str(c))
    meta = {
        "carcert.input_layout": "NCHW",
        "carcert.input_shape": json.dumps(["N", c, h, w]),
        "carcert.input_channels": channels,
        "carcert.input_size": f"{h}x{w} (height x width)",
        "carcert.input_scaling": _scaling(str(dataset.get("ref", ""))),
        "carcert.output": "logits (N, num_classes); argmax is the predicted class",
        "carcert.num_classes": str(metrics.get("num_classes", dataset.get("num_classes", ""))),
        "carcert.arch": str(metrics.get("arch", "")),
        "carcert.method": str(metrics.get("method")),
        "carcert.prune_ratio": str(metrics.get("prune_ratio")),
        "carcert.sparsity": str(metrics.get("sparsity")),
        "carcert.dataset": str(dataset.get("ref", "")),
        "carcert.model_sha256": str(metrics.get("model_sha256", "")),
    }
    if certificate is not None:
        meta["carcert.certificate_sha256"] = certificate_sha256(certificate)
        meta["carcert.pca"] = str(certificate.get("pca"))
        meta["carcert.epsilon"] = str((certificate.get("params") or {}).get("epsilon"))
    return meta


def load_deploy_model(weights: Path, program: Path | None = None) -> nn.Module:
    """The pruned network in eval mode on the CPU: the program (its weights are the pruned ones) or
    the built-in architecture named in the safetensors metadata with those weights."""
    if program is not None:
        from core.program import load_program_model

        return load_program_model(program).cpu().eval()
    meta = weights_metadata(weights)
    missing = [k for k in ("arch", "num_classes", "in_channels") if k not in meta]
    if missing:
        raise ExportError(
            f"{Path(weights).name} lacks the metadata {', '.join(missing)} (not a carcert output?)"
        )
    model = build_model(
        meta["arch"],
        int(meta["num_classes"]),
        int(meta["in_channels"]),
        small_input=meta.get("small_input", "True") == "True",
    )
    load_weights(model, weights)
    return model.eval()


def _exported(model: nn.Module, shape: tuple[int, int, int]) -> torch.export.ExportedProgram:
    net = copy.deepcopy(model).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - reported with the reason
        raise ExportError(
            f"cannot export the model with torch.export: {str(exc).splitlines()[0][:300]}"
        ) from None


def _write_pt2(ep: torch.export.ExportedProgram, out: Path, meta: dict[str, str]) -> None:
    torch.export.save(ep, str(out), extra_files={METADATA_FILE: json.dumps(meta, sort_keys=True)})


def _write_onnx(ep: torch.export.ExportedProgram, out: Path, meta: dict[str, str]) -> None:
    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            ep, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, verbose=False
        )
    except Exception as exc:  # noqa: BLE001 - an op without ONNX conversion: the reason
        raise ExportError(f"cannot convert the model to ONNX: {str(exc).splitlines()[0][:300]}") from None
    proto = program.model_proto
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(out))


def export_deployable(
    fmt: str,
    out: Path,
    *,
    weights: Path,
    metrics: dict[str, Any],
    certificate: dict[str, Any] | None,
    program: Path | None = None,
) -> str:
    """Write the variant's network as `fmt` ("pt2" or "onnx") to `out` atomically (module
    docstring) and return the file's sha256."""
    if fmt not in ("pt2", "onnx"):
        raise ExportError(f"format must be pt2 or onnx, not {fmt!r}")
    out = Path(out)
    meta = deploy_metadata(metrics, certificate)
    model = load_deploy_model(weights, program)
    shape = json.loads(meta["carcert.input_shape"])[1:]
    ep = _exported(model, tuple(shape))
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        (_write_pt2 if fmt == "pt2" else _write_onnx)(ep, tmp, meta)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(out)
