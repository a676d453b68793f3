"""core.data: dataset references, deterministic splits, manifest hashes, path confinement."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import DEFAULT_FASHION_DIR, SPLIT_SEED, load_dataset, manifest_sha256, read_idx
from core.errors import DatasetError

# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_and_values() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = load_dataset("digits")
    n = len(d.target)
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.test_x.shape[1:] == (1, 8, 8)
    assert ds.train_x.shape[0] + ds.test_x.shape[0] == n
    assert ds.test_x.shape[0] == round(0.2 * n)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_channels == 1
    assert float(ds.train_x.min()) >= 0.0 and float(ds.train_x.max()) <= 1.0
    # the union of both splits is exactly sklearn's data (values / 16), each sample once
    both = torch.cat([ds.train_x, ds.test_x]).reshape(n, 64).numpy() * 16
    ours = sorted(map(tuple, np.round(both).astype(int).tolist()))
    ref = sorted(map(tuple, d.data.astype(int).tolist()))
    assert ours == ref


def test_digits_split_determinism() -> None:
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.sha256 == b.sha256
    assert a.split_seed == SPLIT_SEED and a.describe()["split_seed"] == SPLIT_SEED
    c = load_dataset("digits", split_seed=SPLIT_SEED + 1)
    assert not torch.equal(a.test_x, c.test_x) and a.sha256 != c.sha256


def test_split_never_depends_on_the_job_seed() -> None:
    """Issue 10: certifying a seed-0 model with --seed 1 put 46 of 50 certified samples inside its
    training set. The job seed now draws only the training subset, never the split."""
    a, c = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.test_x, c.test_x) and torch.equal(a.train_x, c.train_x) and a.sha256 == c.sha256
    sub0 = load_dataset("digits", seed=0, train_subset=300)
    sub1 = load_dataset("digits", seed=1, train_subset=300)
    assert torch.equal(sub0.test_x, sub1.test_x) and not torch.equal(sub0.train_x, sub1.train_x)
    # no test image is a training image of any seed (digits has a few exact duplicates: compare sets)
    train = {bytes(r.numpy().tobytes()) for r in a.train_x}
    test = [bytes(r.numpy().tobytes()) for r in c.test_x[:50]]
    assert sum(t in train for t in test) <= 2


def test_manifest_hash_independent_computation() -> None:
    ds = load_dataset("digits")
    manifest = {}
    for name, t in (("test_x", ds.test_x), ("test_y", ds.test_y), ("train_x", ds.train_x),
                    ("train_y", ds.train_y)):
        a = np.ascontiguousarray(t.numpy())
        manifest[name] = {"dtype": str(a.dtype), "shape": list(a.shape),
                          "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    expected = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    assert ds.sha256 == expected
    # a single changed pixel changes the hash
    x = ds.train_x.clone()
    x[0, 0, 0, 0] += 0.5
    assert manifest_sha256({"train_x": x}) != manifest_sha256({"train_x": ds.train_x})


def test_train_subset() -> None:
    full = load_dataset("digits", seed=2)
    sub = load_dataset("digits", seed=2, train_subset=100)
    assert sub.train_x.shape[0] == 100
    idx = sub.train_indices
    assert idx is not None and torch.all(idx[1:] > idx[:-1])  # source order
    assert torch.equal(sub.train_x, full.train_x[idx]) and torch.equal(sub.train_y, full.train_y[idx])
    assert torch.equal(sub.test_x, full.test_x)  # the test split is untouched
    assert sub.sha256 != full.sha256
    assert load_dataset("digits", seed=2, train_subset=100).sha256 == sub.sha256
    big = load_dataset("digits", seed=2, train_subset=10**6)
    assert big.train_indices is None and big.sha256 == full.sha256
    assert len(set(sub.train_y.tolist())) == 10  # a random, not a first-N, subset


# ------------------------------------------------------------------------------ fashion-mnist

needs_fashion = pytest.mark.skipif(not DEFAULT_FASHION_DIR.is_dir(), reason="fashion-mnist IDX files absent")


def _numpy_idx(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Independent IDX parse: big-endian header with numpy, data as uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4"))
    return dims, np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)


@needs_fashion
def test_fashion_mnist_against_idx_headers() -> None:
    ds = load_dataset("fashion-mnist", train_subset=300)
    d = DEFAULT_FASHION_DIR
    (n_train, h, w), train_pixels = _numpy_idx(d / "train-images-idx3-ubyte.gz")
    (n_test,), test_labels = _numpy_idx(d / "t10k-labels-idx1-ubyte.gz")
    assert (n_train, n_test, h, w) == (60000, 10000, 28, 28)
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.test_y.shape == (10000,)
    assert ds.train_x.shape == (300, 1, 28, 28) and ds.num_classes == 10 and ds.in_channels == 1
    assert np.array_equal(ds.test_y.numpy(), test_labels.astype(np.int64))
    _, train_labels = _numpy_idx(d / "train-labels-idx1-ubyte.gz")
    pixels = train_pixels.reshape(n_train, h, w)
    idx = ds.train_indices.numpy()
    for i in (0, 7, 299):  # pixel-level cross-check of a few kept training images
        src = idx[i]
        assert np.array_equal(np.round(ds.train_x[i, 0].numpy() * 255).astype(np.uint8), pixels[src])
        assert int(ds.train_y[i]) == int(train_labels[src])
    _, test_pixels = _numpy_idx(d / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_allclose(ds.test_x[9999, 0].numpy(), test_pixels.reshape(-1, 28, 28)[9999] / 255.0,
                               rtol=0, atol=1e-7)


@needs_fashion
def test_fashion_mnist_explicit_dir_and_raw_files(tmp_path: Path) -> None:
    # an explicit DIR holding uncompressed files works too, and matches the .gz parse
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(DEFAULT_FASHION_DIR / f"{name}.gz") as f:
            src = f.read()
        if name.startswith("train"):  # keep it small: first 50 training samples, header patched
            ndim = src[3]
            per = 28 * 28 if "images" in name else 1
            src = src[:4] + (50).to_bytes(4, "big") + src[8 : 4 + 4 * ndim] + src[4 + 4 * ndim :][: 50 * per]
        (tmp_path / name).write_bytes(src)
    ds = load_dataset(f"fashion-mnist:{tmp_path}", allowed_roots=[tmp_path])
    assert ds.train_x.shape == (50, 1, 28, 28)
    ref = load_dataset("fashion-mnist", train_subset=None)
    assert torch.equal(ds.train_x[:], ref.train_x[:50]) and torch.equal(ds.test_y, ref.test_y)


def test_idx_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DatasetError, match="announces"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"fashion-mnist:{tmp_path / 'none'}")
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset(f"fashion-mnist:{tmp_path / 'd'}")


# --------------------------------------------------------------------------------------- npz


def test_npz_uint8_nhwc_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, size=(20, 6, 5, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, size=(8, 6, 5, 3), dtype=np.uint8)
    ytr, yte = rng.integers(0, 4, 20), rng.integers(0, 4, 8)
    ytr[0] = 3
    variants = rng.integers(0, 256, size=(8, 2, 3, 6, 5), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, variants_test=variants)
    ds = load_dataset(f"npz:{path}")
    assert ds.train_x.shape == (20, 3, 6, 5) and ds.in_channels == 3 and ds.num_classes == 4
    np.testing.assert_allclose(ds.train_x[:].numpy(), xtr.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.test_y.numpy(), yte)
    assert torch.equal(ds.extras["variants_test"], torch.from_numpy(variants))
    assert ds.extras["variants_test"].dtype == torch.uint8


def test_npz_float_nchw_and_nhw(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((10, 1, 7, 7)).astype(np.float32)
    p1, p2 = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(p1, x_train=x, y_train=np.arange(10) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
    np.savez(p2, x_train=x[:, 0], y_train=np.arange(10) % 2, x_test=x[:4, 0], y_test=np.arange(4) % 2)
    a, b = load_dataset(f"npz:{p1}"), load_dataset(f"npz:{p2}")
    assert torch.equal(a.train_x[:], torch.from_numpy(x)) and torch.equal(a.train_x[:], b.train_x[:])
    assert a.sha256 == b.sha256  # same data, same manifest hash, whatever the layout on disk


def test_npz_train_extras_follow_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.random((30, 1, 4, 4)).astype(np.float32)
    tags = np.arange(30)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=tags % 3, x_test=x[:5], y_test=tags[:5] % 3, variants_train=tags,
             other=tags)
    ds = load_dataset(f"npz:{path}", train_subset=12, seed=4)
    assert torch.equal(ds.extras["variants_train"], ds.train_indices)
    assert torch.equal(ds.extras["other"], torch.from_numpy(tags))


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((3, 4, 4)), y_train=np.zeros(3, int))
    with pytest.raises(DatasetError, match="x_test, y_test"):
        load_dataset(f"npz:{path}")
    np.savez(path, x_train=np.full((3, 4, 4), 2.0), y_train=np.zeros(3, int), x_test=np.zeros((3, 4, 4)),
             y_test=np.zeros(3, int))
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        load_dataset(f"npz:{path}")
    np.savez(path, x_train=np.zeros((3, 4, 4)), y_train=np.zeros(2, int), x_test=np.zeros((3, 4, 4)),
             y_test=np.zeros(3, int))
    with pytest.raises(DatasetError, match="y_train"):
        load_dataset(f"npz:{path}")
    obj = np.empty(3, dtype=object)
    np.savez(path, x_train=obj, y_train=np.zeros(3, int), x_test=obj, y_test=np.zeros(3, int))
    with pytest.raises(DatasetError, match="pickled"):
        load_dataset(f"npz:{path}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# ------------------------------------------------------------------------------- imagefolder


def _write_images(root: Path, rng: np.random.Generator, classes: dict[str, int], size=(6, 5), mode="RGB"):
    arrays = {}
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(a, mode=mode).save(root / cls / f"{i:03d}.png")
            arrays[(cls, i)] = a
    return arrays


def test_imagefolder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = _write_images(tmp_path / "ds", rng, {"cat": 6, "dog": 4})
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}", seed=3)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.in_channels == 3
    assert ds.train_x.shape[0] + ds.test_x.shape[0] == 10 and ds.test_x.shape[0] == 2
    assert ds.train_x.shape[1:] == (3, 5, 6)
    x = torch.cat([ds.train_x[:], ds.test_x[:]])
    y = torch.cat([ds.train_y, ds.test_y])
    # every image comes back pixel-exact with its class label (PNG is lossless)
    found = 0
    for (cls, _), a in arrays.items():
        ref = torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255.0)
        hits = [j for j in range(10) if torch.equal(x[j], ref)]
        assert len(hits) == 1 and int(y[hits[0]]) == ds.classes.index(cls)
        found += 1
    assert found == 10
    assert load_dataset(f"imagefolder:{tmp_path / 'ds'}", seed=3).sha256 == ds.sha256
    # the split is seeded by the fixed split seed, never the job seed
    other = load_dataset(f"imagefolder:{tmp_path / 'ds'}", seed=4)
    assert torch.equal(other.test_x[:], ds.test_x[:]) and ds.split_seed == other.split_seed == SPLIT_SEED


def test_imagefolder_presplit_grey_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _write_images(tmp_path / "ds" / "train", rng, {"a": 3, "b": 3}, size=(8, 8), mode="L")
    _write_images(tmp_path / "ds" / "test", rng, {"a": 1, "b": 1}, size=(8, 8), mode="L")
    odd = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(odd, mode="L").save(tmp_path / "ds" / "test" / "b" / "big.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert ds.in_channels == 1 and ds.train_x.shape == (6, 1, 8, 8) and ds.test_x.shape == (3, 1, 8, 8)
    assert ds.split_seed is None  # the folders' own split
    assert ds.test_y.tolist() == [0, 1, 1]
    ref = np.asarray(Image.fromarray(odd, mode="L").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255
    big = [j for j in range(3) if np.allclose(ds.test_x[j, 0].numpy(), ref)]
    assert len(big) == 1


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DatasetError, match="2 class"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "b" / "y.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        load_dataset(f"imagefolder:{tmp_path / 'bad'}")


# ------------------------------------------------------------------------ references, roots


def test_allowed_roots(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    x = np.zeros((4, 4, 4), np.uint8)
    for d in (inside, outside):
        np.savez(d / "d.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x, y_test=np.arange(4) % 2)
    assert load_dataset(f"npz:{inside / 'd.npz'}", allowed_roots=[inside]).train_x.shape[0] == 4
    with pytest.raises(DatasetError, match="outside the allowed"):
        load_dataset(f"npz:{outside / 'd.npz'}", allowed_roots=[inside])
    with pytest.raises(DatasetError, match="outside the allowed"):  # .. traversal
        load_dataset(f"npz:{inside / '..' / 'out' / 'd.npz'}", allowed_roots=[inside])
    (inside / "link.npz").symlink_to(outside / "d.npz")  # a symlink out of the root
    with pytest.raises(DatasetError, match="outside the allowed"):
        load_dataset(f"npz:{inside / 'link.npz'}", allowed_roots=[inside])
    with pytest.raises(DatasetError, match="outside the allowed"):
        load_dataset(f"imagefolder:{outside}", allowed_roots=[inside])
    with pytest.raises(DatasetError, match="outside the allowed"):
        load_dataset(f"fashion-mnist:{outside}", allowed_roots=[inside])


@pytest.mark.parametrize("ref", ["", "mnist", "digits:foo", "npz:", "imagefolder:", "cifar10:/x"])
def test_bad_refs_explain_valid_forms(ref: str) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(ref)
    msg = str(err.value)
    assert "npz:PATH" in msg or "needs a path" in msg


def test_missing_npz_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
