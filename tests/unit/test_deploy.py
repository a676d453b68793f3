"""core.deploy: a pruned model exported as .pt2 and .onnx gives the logits of the safetensors model
(onnxruntime; torch alone in an isolated interpreter) and carries its preprocessing contract and
the certificate's hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.data import load_dataset
from core.deploy import ExportError, export_deployable
from core.models import build_model, save_weights
from core.program import export_program, load_program_model
from tests.deploy_helpers import run_onnx, run_pt2_alone
from tests.programs import TwoHeadGroupNet, export

CERT = {"pca": 0.5, "params": {"epsilon": 0.001}, "created_at": "2026-01-01", "job_id": "j1", "x": [1, 2]}


def _metrics(arch: str, shape: list[int]) -> dict:
    return {
        "arch": arch,
        "method": "lmp",
        "prune_ratio": 0.5,
        "sparsity": 0.5,
        "num_classes": 10,
        "model_sha256": "m" * 64,
        "dataset": {"ref": "digits", "shape": shape, "num_classes": 10},
    }


def _pruned_small_cnn(folder: Path) -> Path:
    """small_cnn (1 x 8 x 8, 10 classes) with half of every conv / linear weight zeroed, saved with
    the metadata the pipeline writes."""
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, small_input=True).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.mul_((torch.rand_like(p) > 0.5).float())
    path = folder / "model.safetensors"
    meta = {"arch": "small_cnn", "num_classes": "10", "in_channels": "1", "small_input": "True"}
    save_weights(net, path, metadata=meta)
    return path


def _reference_logits(weights: Path, x: np.ndarray) -> np.ndarray:
    """The safetensors weights in a freshly built small_cnn (not through core.deploy)."""
    net = build_model("small_cnn", 10, 1, small_input=True)
    net.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def _expected_cert_sha() -> str:
    body = {k: v for k, v in CERT.items() if k not in ("created_at", "job_id")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    return load_dataset("digits", seed=0).test_x[:37].numpy()


def test_small_cnn_onnx_and_pt2_match_safetensors(tmp_path: Path, digits_x: np.ndarray) -> None:
    weights = _pruned_small_cnn(tmp_path)
    metrics = _metrics("small_cnn", [1, 8, 8])
    ref = _reference_logits(weights, digits_x)
    onnx_path, pt2_path = tmp_path / "model.onnx", tmp_path / "model.pt2"
    sha = export_deployable("onnx", onnx_path, weights=weights, metrics=metrics, certificate=CERT)
    assert sha == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    export_deployable("pt2", pt2_path, weights=weights, metrics=metrics, certificate=CERT)

    logits, meta = run_onnx(onnx_path, digits_x)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    one, _ = run_onnx(onnx_path, digits_x[:1])  # the batch dimension is dynamic
    np.testing.assert_allclose(one, ref[:1], atol=1e-4, rtol=0)
    assert meta["carcert.certificate_sha256"] == _expected_cert_sha()
    assert json.loads(meta["carcert.input_shape"]) == ["N", 1, 8, 8]
    assert meta["carcert.input_channels"] == "1 (grayscale)"
    assert "divided by 16" in meta["carcert.input_scaling"]
    assert meta["carcert.num_classes"] == "10" and meta["carcert.arch"] == "small_cnn"

    alone, text = run_pt2_alone(pt2_path, digits_x, tmp_path)
    np.testing.assert_allclose(alone, ref, atol=1e-5, rtol=0)
    assert json.loads(text) == meta  # the same metadata in the archive's carcert.json


def test_program_to_onnx(tmp_path: Path, digits_x: np.ndarray) -> None:
    """A user's program (grouped / depthwise conv, BatchNorm, GELU, dropout) exported to ONNX
    from its pruned .pt2."""
    torch.manual_seed(3)
    program = load_program_model(export(TwoHeadGroupNet(), tmp_path / "net.pt2", "train"))
    with torch.no_grad():
        program.stem.weight.mul_((torch.rand_like(program.stem.weight) > 0.5).float())
    pruned = tmp_path / "pruned.pt2"
    export_program(program, torch.from_numpy(digits_x), pruned)
    save_weights(program, tmp_path / "model.safetensors", metadata={"arch": "program"})
    out = tmp_path / "model.onnx"
    metrics = _metrics("program", [1, 8, 8])
    export_deployable(
        "onnx", out, weights=tmp_path / "model.safetensors", metrics=metrics, certificate=CERT, program=pruned
    )
    with torch.no_grad():
        ref = program.eval()(torch.from_numpy(digits_x)).numpy()
    logits, meta = run_onnx(out, digits_x)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    assert meta["carcert.arch"] == "program"


def test_weights_without_metadata_are_refused(tmp_path: Path) -> None:
    save_weights(build_model("small_cnn", 10, 1), tmp_path / "w.safetensors")
    with pytest.raises(ExportError, match="lacks the metadata arch"):
        export_deployable(
            "onnx",
            tmp_path / "m.onnx",
            weights=tmp_path / "w.safetensors",
            metrics=_metrics("small_cnn", [1, 8, 8]),
            certificate=None,
        )
    with pytest.raises(ExportError, match="pt2 or onnx"):
        export_deployable(
            "tflite", tmp_path / "m", weights=tmp_path / "w.safetensors", metrics={}, certificate=None
        )


def test_cli_export_of_a_result_folder(tmp_path: Path, digits_x: np.ndarray) -> None:
    from carcert.cli import main

    weights = _pruned_small_cnn(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics("small_cnn", [1, 8, 8])))
    (tmp_path / "certificate.json").write_text(json.dumps(CERT))
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 0
    logits, meta = run_onnx(tmp_path / "model.onnx", digits_x)
    np.testing.assert_allclose(logits, _reference_logits(weights, digits_x), atol=1e-4, rtol=0)
    assert meta["carcert.certificate_sha256"] == _expected_cert_sha()
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 2
