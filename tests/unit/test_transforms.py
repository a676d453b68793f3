"""core.transforms against direct formulas, torch reference ops, sklearn PCA and torch.export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from core.errors import TransformError
from core.spec import TransformSpec
from core.transforms import PARAMETRIC, build_transform, load_exported


@dataclass
class FakeSplit:
    train_x: torch.Tensor
    test_x: torch.Tensor
    extras: dict = field(default_factory=dict)


def _x(b: int = 4, c: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", [*PARAMETRIC, "brightness+blur", "gamma+rotation+scale"])
def test_delta_zero_is_identity_and_shapes(name: str) -> None:
    t = build_transform(TransformSpec(kind="parametric", name=name))
    x = _x()
    y = t(x, torch.zeros(4))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.equal(y, x)
    z = t(x, torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert z.shape == x.shape and z.min() >= 0 and z.max() <= 1
    assert not torch.equal(z, x)
    # deterministic and independent of the batch composition
    assert torch.allclose(t(x[2:3], torch.tensor([0.75])), z[2:3], atol=1e-6)


def test_brightness_gamma_contrast_direct_formula() -> None:
    x = _x()
    d = torch.tensor([0.0, 0.3, 0.6, 1.0])
    for s in (1.0, 0.5):
        b = build_transform(TransformSpec(kind="parametric", name="brightness", strength=s))(x, d)
        ref = np.clip(x.numpy() + 0.3 * s * d.numpy()[:, None, None, None], 0, 1)
        np.testing.assert_allclose(b.numpy(), ref, atol=1e-6)
        g = build_transform(TransformSpec(kind="parametric", name="gamma", strength=s))(x, d)
        ref = x.numpy() ** (1 + s * d.numpy()[:, None, None, None])
        np.testing.assert_allclose(g.numpy(), ref, atol=1e-6)
    c = build_transform(TransformSpec(kind="parametric", name="contrast"))(x, torch.ones(4))
    m = x.numpy().mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(c.numpy(), m + 0.5 * (x.numpy() - m), atol=1e-6)


def test_illumination_gradient_and_cast() -> None:
    x = torch.full((1, 3, 5, 5), 0.5)
    y = build_transform(TransformSpec(kind="parametric", name="illumination"))(x, torch.ones(1))
    # top-left: +0.3 + cast; bottom-right: cast only
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), [0.5 + 0.3 + 0.08, 0.5 + 0.3 + 0.03, 0.5 + 0.3 - 0.05],
                               atol=1e-6)
    np.testing.assert_allclose(y[0, :, -1, -1].numpy(), [0.58, 0.53, 0.45], atol=1e-6)
    g = torch.full((2, 1, 5, 5), 0.2)
    yg = build_transform(TransformSpec(kind="parametric", name="illumination"))(g, torch.tensor([1.0, 0.5]))
    assert yg[0, 0, 0, 0].item() == pytest.approx(0.5) and yg[0, 0, -1, -1].item() == pytest.approx(0.2)
    assert yg[1, 0, 0, 0].item() == pytest.approx(0.35)
    assert yg[0, 0, 2, 2].item() == pytest.approx(0.2 + 0.15)  # centre: half the gradient


def test_blur_matches_direct_gaussian() -> None:
    x = _x(2, 1, 9, 9)
    y = build_transform(TransformSpec(kind="parametric", name="blur"))(x, torch.tensor([1.0, 0.5]))
    for b, sigma in ((0, 1.5), (1, 0.75)):
        r = math.ceil(4.5)
        k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
        k /= k.sum()
        img = np.pad(x[b, 0].numpy().astype(np.float64), r, mode="edge")
        rows = np.stack([np.convolve(row, k, mode="valid") for row in img[r:-r]])
        img2 = np.pad(rows, ((r, r), (0, 0)), mode="edge")
        ref = np.stack([np.convolve(col, k, mode="valid") for col in img2.T]).T
        np.testing.assert_allclose(y[b, 0].numpy(), ref, atol=1e-5)


def test_rotation_and_translation_geometry() -> None:
    x = _x(2, 1, 8, 8)
    # strength 3 -> 90 degrees counter-clockwise = torch.rot90(k=1) on (H, W)
    y = build_transform(TransformSpec(kind="parametric", name="rotation", strength=3.0))(x, torch.ones(2))
    torch.testing.assert_close(y, torch.rot90(x, 1, [2, 3]), atol=1e-5, rtol=0)
    # shift 0.15 * s * 8 = 2 pixels right and down
    shift = build_transform(TransformSpec(kind="parametric", name="translation", strength=2 / 1.2))
    y = shift(x, torch.ones(2))
    torch.testing.assert_close(y[..., 2:, 2:], x[..., :-2, :-2], atol=1e-5, rtol=0)
    # zoom 1.3 keeps the centre pixel value for an odd image size
    xo = _x(1, 1, 9, 9)
    ys = build_transform(TransformSpec(kind="parametric", name="scale"))(xo, torch.ones(1))
    assert ys[0, 0, 4, 4].item() == pytest.approx(xo[0, 0, 4, 4].item(), abs=1e-6)


def test_differentiable_and_float_delta() -> None:
    x = _x().requires_grad_(True)
    t = build_transform(TransformSpec(kind="parametric", name="illumination+blur+rotation"))
    t(x, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_names() -> None:
    with pytest.raises(TransformError, match="brightness"):
        build_transform(TransformSpec(kind="parametric", name="sunburn"))
    with pytest.raises(TransformError, match="valid names"):
        build_transform(TransformSpec(kind="parametric", name="blur+"))
    with pytest.raises(TransformError, match="train"):
        build_transform(TransformSpec(kind="latent"))


def test_pca_direction_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.rand(300, 1, 6, 6, generator=g) * 0.3
    light = torch.rand(300, 1, 1, 1, generator=g)
    train = (base + 0.5 * light).clamp(0, 1)
    split = FakeSplit(train_x=train, test_x=train[:10])
    for comp in (0, 2):
        t = build_transform(TransformSpec(kind="latent", component=comp, strength=0.5), data=split)
        ref = PCA(n_components=comp + 1, svd_solver="full").fit(train.reshape(300, -1).double().numpy())
        v = ref.components_[comp]
        got = t.direction.reshape(-1).numpy()
        assert min(np.abs(got - v).max(), np.abs(got + v).max()) < 1e-6
        codes = (train.reshape(300, -1).double().numpy() - ref.mean_) @ v
        assert t.magnitude == pytest.approx(3 * codes.std() * 0.5, rel=1e-6)
        x = train[:4]
        d = torch.tensor([0.0, 0.2, 0.5, 1.0])
        y = t(x, d)
        assert torch.equal(y[0], x[0])
        vec = torch.from_numpy(got).float().view(1, 6, 6)
        exp = (x + (t.magnitude * d).view(-1, 1, 1, 1) * vec).clamp(0, 1)
        torch.testing.assert_close(y, exp, atol=1e-6, rtol=0)
    # first component brightens (sign convention)
    t0 = build_transform(TransformSpec(kind="latent"), data=split)
    assert t0.direction.sum() > 0
    assert t0.describe()["generator"] == "pca"


def test_exported_encoder_decoder(tmp_path) -> None:
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 5))
    dec = torch.nn.Sequential(torch.nn.Linear(5, 2 * 4 * 4), torch.nn.Sigmoid())
    batch = torch.export.Dim("batch", min=1)
    ep_e = torch.export.export(enc, (torch.rand(3, 2, 4, 4),), dynamic_shapes=({0: batch},))
    ep_d = torch.export.export(dec, (torch.rand(3, 5),), dynamic_shapes=({0: batch},))
    torch.export.save(ep_e, tmp_path / "enc.pt2")
    torch.export.save(ep_d, tmp_path / "dec.pt2")
    train = torch.rand(50, 2, 4, 4)
    spec = TransformSpec(kind="latent", encoder=str(tmp_path / "enc.pt2"), decoder=str(tmp_path / "dec.pt2"),
                         component=3, strength=2.0)
    t = build_transform(spec, data=FakeSplit(train_x=train, test_x=train[:5]))
    with torch.no_grad():
        codes = enc(train)
        mag = 3 * codes[:, 3].double().std(unbiased=False).item() * 2.0
        assert t.magnitude == pytest.approx(mag, rel=1e-5)
        x = train[:3]
        d = torch.tensor([0.0, 0.5, 1.0])
        z = enc(x)
        z[:, 3] += mag * d
        ref = dec(z).reshape(x.shape)
        torch.testing.assert_close(t(x, d), ref, atol=1e-5, rtol=0)
    assert len(t.describe()["encoder_sha256"]) == 64
    with pytest.raises(TransformError):
        load_exported(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(TransformError, match="archive"):
        load_exported(tmp_path / "junk.pt2")


def test_precomputed_variants_nearest_delta() -> None:
    n, v = 6, 4
    variants = torch.rand(n, v, 1, 3, 3)
    deltas = torch.tensor([[0.0, 0.3, 0.6, 1.0]] * n)
    split = FakeSplit(train_x=torch.rand(2, 1, 3, 3), test_x=torch.rand(n, 1, 3, 3),
                      extras={"variants_test": variants, "variant_deltas_test": deltas})
    t = build_transform(TransformSpec(kind="precomputed"), data=split)
    idx = torch.tensor([0, 1, 2, 5, 5])
    d = torch.tensor([0.1, 0.4, 0.85, 1.0, 0.55])
    y = t(split.test_x[idx], d, idx)
    for row, (i, want) in enumerate(zip(idx.tolist(), [0, 1, 3, 3, 2], strict=True)):
        assert torch.equal(y[row], variants[i, want])
    u8 = (variants * 255).to(torch.uint8)
    t8 = build_transform(TransformSpec(kind="precomputed"),
                         data=FakeSplit(train_x=split.train_x, test_x=split.test_x,
                                        extras={"variants_test": u8}))
    y8 = t8(split.test_x[:1], torch.tensor([1.0]), torch.tensor([0]))
    torch.testing.assert_close(y8[0], u8[0, 3].float() / 255)
    with pytest.raises(TransformError, match="indices"):
        t(split.test_x[:1], torch.tensor([0.5]))
    with pytest.raises(TransformError, match="variants_test"):
        build_transform(TransformSpec(kind="precomputed"), data=FakeSplit(split.train_x, split.test_x))


def test_exported_archive_with_pickled_payload_is_refused(tmp_path) -> None:
    import json
    import zipfile

    lin = torch.nn.Linear(4, 2)
    torch.export.save(torch.export.export(lin, (torch.rand(1, 4),)), tmp_path / "ok.pt2")
    assert load_exported(tmp_path / "ok.pt2")(torch.ones(1, 4)).shape == (1, 2)
    with zipfile.ZipFile(tmp_path / "ok.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            dst.writestr(info, data)
    with pytest.raises(TransformError, match="pickled"):
        load_exported(tmp_path / "evil.pt2")
