"""core.datasets / core.preprocess: streamed splits behave like the tensors they stand for, are read
only where needed, and train to exactly the in-memory result; the preprocess contract."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import load_dataset
from core.datasets import ArrayImages, FileImages
from core.errors import DatasetError


def _npz(path: Path, n: int = 40, compressed: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(n) % 3,
        "x_test": rng.random((10, 3, 8, 8)).astype(np.float32),
        "y_test": np.arange(10) % 3,
    }
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_match_numpy_and_are_memory_mapped(tmp_path: Path, compressed: bool) -> None:
    arrays = _npz(tmp_path / "d.npz", compressed=compressed)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert isinstance(ds.train_x, ArrayImages)
    assert isinstance(ds.train_x.array, np.memmap) is not compressed  # stored members are never read whole
    ref = torch.from_numpy(arrays["x_train"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    assert torch.equal(ds.train_x[:], ref)
    assert torch.equal(ds.test_x[:], torch.from_numpy(arrays["x_test"]))


def test_image_source_indexing_is_tensor_indexing(tmp_path: Path) -> None:
    _npz(tmp_path / "d.npz")
    x = load_dataset(f"npz:{tmp_path / 'd.npz'}").train_x
    t = x[:]
    mask = torch.arange(len(t)) % 3 == 0
    keys = [
        5,
        -1,
        slice(3, 30, 4),
        torch.tensor([7, 2, 2, 39]),
        [0, -2],
        mask,
        np.array([1, 3]),
        (4, 1),
        (slice(0, 5), 2),
    ]
    for key in keys:
        assert torch.equal(x[key], t[key]), key
    assert torch.equal(x.index_select(0, torch.tensor([9, 1])), t.index_select(0, torch.tensor([9, 1])))
    assert x.shape == t.shape and len(x) == len(t) and x.dtype == t.dtype
    with pytest.raises(IndexError):
        x[len(t)]


def _folder(root: Path, n: int, size: int = 12) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)).save(
            d / f"{i:03d}.png"
        )


def test_certification_reads_only_the_certified_samples(tmp_path: Path, monkeypatch) -> None:
    from core.certify import certify_model
    from core.models import build_model
    from core.spec import CertifySpec, TransformSpec
    from core.transforms import build_transform

    _folder(tmp_path / "ds", 60)
    read: list[str] = []
    orig = FileImages.load

    def counting(self: FileImages, i: int) -> np.ndarray:
        read.append(self.files[i])
        return orig(self, i)

    monkeypatch.setattr(FileImages, "load", counting)
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert read == [] and isinstance(ds.test_x, FileImages)  # loading decodes nothing
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 3)
    t = build_transform(TransformSpec(kind="parametric", name="brightness"))
    certify_model(model, ds.test_x, ds.test_y, t, CertifySpec(n=4, l=1, samples=3, t_steps=5), seed=0)
    assert sorted(set(read)) == sorted(ds.test_x.files[:3])


def test_streamed_training_equals_in_memory_training(tmp_path: Path, monkeypatch) -> None:
    """The same images as a tensor (direct indexing) and as PNG files decoded by a DataLoader worker
    process, with a transform augmentation and BatchNorm re-estimation: bit-identical weights."""
    from core.models import build_model
    from core.spec import TransformSpec
    from core.training import augment_with_transform, recalibrate_batchnorm, train_epochs
    from core.transforms import build_transform

    monkeypatch.setenv("CARCERT_LOADER_WORKERS", "1")
    _folder(tmp_path / "ds", 90, size=8)
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert isinstance(ds.train_x, FileImages) and ds.train_x.decodes
    t = build_transform(TransformSpec(kind="parametric", name="contrast"))
    results = []
    for x in (ds.train_x[:], ds.train_x):
        xa, ya, index = augment_with_transform(x, ds.train_y, t, 20, seed=3)
        torch.manual_seed(0)
        model = build_model("small_cnn", 3, 3)
        train_epochs(model, xa, ya, epochs=2, lr=0.01, batch_size=16, seed=5)
        recalibrate_batchnorm(model, xa, seed=1)
        results.append((xa[:], index, model.state_dict()))
    (xm, im, sm), (xs, is_, ss) = results
    assert torch.equal(xm, xs) and torch.equal(im, is_)
    for k in sm:
        assert torch.equal(sm[k], ss[k]), k


def test_geometry_is_torchvision_resize_and_center_crop(tmp_path: Path) -> None:
    from torchvision.transforms import functional as tf

    _folder(tmp_path / "ds", 9, size=20)
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}", resize=10, crop=8)
    assert ds.train_x.shape[1:] == (3, 8, 8) and ds.describe()["geometry"] == {"resize": 10, "crop": 8}
    im = Image.open(tmp_path / "ds" / ds.test_x.files[0]).convert("RGB")
    ref = tf.to_tensor(tf.center_crop(tf.resize(im, [10], antialias=True), [8]))
    assert torch.allclose(ds.test_x[0], ref, atol=1e-6)
    plain = load_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert plain.sha256 != ds.sha256 and plain.train_x.shape[1:] == (3, 20, 24)
    digits = load_dataset("digits", resize=16)  # tensors get the same geometry per batch
    assert digits.train_x.shape[1:] == (1, 16, 16) and float(digits.train_x[:5].max()) <= 1.0


def test_resize_alone_crops_square_and_bad_images_fail_clearly(tmp_path: Path) -> None:
    _folder(tmp_path / "ds", 6, size=12)
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}", resize=6)
    assert ds.train_x.shape[1:] == (3, 6, 6)  # crop defaults to resize: square
    with pytest.raises(DatasetError, match="cannot read image"):
        (tmp_path / "ds" / "c0" / "000.png").write_bytes(b"junk")
        load_dataset(f"imagefolder:{tmp_path / 'ds'}").train_x[:]


def test_normalize_hook_keeps_names_and_exports_raw_input() -> None:
    from core.car import fold_batchnorm
    from core.models import build_model
    from core.preprocess import Normalize, attach_normalize, exportable

    torch.manual_seed(0)
    net = build_model("resnet18", 4, 3).eval()
    plain = copy.deepcopy(net)
    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x = torch.rand(3, 3, 16, 16)
    mean, std = (
        torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1),
    )
    want = plain((x - mean) / std)
    attach_normalize(net, norm)
    assert list(net.state_dict()) == list(plain.state_dict())  # weights / masks keep their names
    assert torch.allclose(net(x), want, atol=1e-6)
    assert torch.allclose(copy.deepcopy(net)(x), want, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(net)(x), want, atol=1e-5)
    ep = torch.export.export(exportable(net), (x,))
    assert torch.allclose(ep.module()(x), want, atol=1e-6)


def test_preprocess_spec_validation() -> None:
    from pydantic import ValidationError

    from core.spec import JobSpec, PreprocessSpec

    assert JobSpec().preprocess == PreprocessSpec()
    for bad in (
        {"mean": [0.5]},
        {"mean": [0.5, 0.5], "std": [0.2]},
        {"mean": [0.5], "std": [0.0]},
        {"resize": 8, "crop": 9},
        {"resize": 0},
        {"crop": 10, "extra": 1},
    ):
        with pytest.raises(ValidationError):
            PreprocessSpec(**bad)


def test_cli_prune_records_and_verifies_the_preprocess(tmp_path: Path) -> None:
    from carcert.cli import main
    from core.models import weights_metadata

    out = tmp_path / "run"
    assert (
        main(
            [
                "prune",
                "--arch",
                "small_cnn",
                "--dataset",
                "digits",
                "--method",
                "lmp",
                "--prune-ratio",
                "0.5",
                "--epochs",
                "1",
                "--train-subset",
                "200",
                "--samples",
                "4",
                "--n",
                "8",
                "--l",
                "2",
                "--t-steps",
                "20",
                "--resize",
                "12",
                "--mean",
                "0.3",
                "--std",
                "0.4",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    folder = out  # a single variant writes its files into --out itself
    cert = json.loads((folder / "certificate.json").read_text())
    want = {"resize": 12, "crop": None, "mean": [0.3], "std": [0.4]}
    assert cert["model"]["preprocess"] == want
    assert json.loads(weights_metadata(folder / "model.safetensors")["preprocess"]) == want
    assert json.loads((folder / "metrics.json").read_text())["dataset"]["shape"] == [1, 12, 12]
    assert main(["verify", str(folder / "certificate.json"), "--recompute"]) == 0
