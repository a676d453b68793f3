"""Dataset references -> train/test tensors plus a manifest sha256 of exactly the data used.

References (DESIGN.md):
    digits                  sklearn ``load_digits`` (1797 8x8 grey images, values / 16, 10 classes);
                            80/20 split seeded by SPLIT_SEED.
    fashion-mnist[:DIR]     the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in DIR
                            (default /usr/share/datasets/fashion-mnist); the official 60000/10000 split.
    npz:PATH                keys x_train, y_train, x_test, y_test; uint8 0..255 or float 0..1 images,
                            NHWC, NCHW or NHW; every other key goes to ``extras`` unchanged (dtype kept).
    imagefolder:PATH        PATH/<class>/<image> (80/20 split seeded by SPLIT_SEED) or
                            PATH/{train,test}/<class>/<image> (``val`` is accepted for ``test``);
                            classes sorted by name; images are resized (bilinear) to the most
                            frequent size; grey if every image is grey.
Images come back as float32 (N, C, H, W) in [0, 1], labels as int64 (N,).

The train/test split never depends on the job seed: seeded splits use ``split_seed`` (default
SPLIT_SEED, recorded in ``DatasetSplit.split_seed`` and in certificates; None for official splits), so
training and certification with any ``seed`` see the same test set. ``seed`` only draws the
training subset.
``train_subset=N`` keeps a seeded random N of the training samples (in source order; their source
indices are in ``DatasetSplit.train_indices``); extras named ``*_train`` with one row per training
sample (e.g. ``variants_train`` of core.transforms' precomputed kind) are subset alike.
``allowed_roots``: every user-given path must lie inside one of them after ``resolve()`` (symlinks
followed), else DatasetError. The built-in default fashion-mnist directory is always allowed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.errors import DatasetError
from core.paths import within_roots

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the fixed seed of the digits / imagefolder train/test split (never the job seed)
REF_FORMS = "digits, fashion-mnist[:DIR], npz:PATH, imagefolder:PATH"


@dataclass
class DatasetSplit:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    ref: str
    sha256: str
    extras: dict[str, Tensor] = field(default_factory=dict)
    train_indices: Tensor | None = None  # source indices of the kept training samples (train_subset)
    classes: list[str] | None = None  # class names where the source has them (imagefolder)
    split_seed: int | None = None  # seed of the train/test split; None: the source's own split

    def describe(self) -> dict:
        """JSON-able summary for certificates and metrics."""
        return {
            "ref": self.ref,
            "sha256": self.sha256,
            "train": int(self.train_x.shape[0]),
            "test": int(self.test_x.shape[0]),
            "shape": list(self.train_x.shape[1:]),
            "num_classes": self.num_classes,
            "split_seed": self.split_seed,
        }


def manifest_sha256(arrays: dict[str, Tensor]) -> str:
    """sha256 of the JSON manifest {name: {dtype, shape, sha256 of the C-contiguous bytes}},
    names sorted: equal data gives equal hashes whatever the source format."""
    manifest = {}
    for name in sorted(arrays):
        a = arrays[name].detach().cpu().contiguous().numpy()
        manifest[name] = {
            "dtype": str(a.dtype),
            "shape": list(a.shape),
            "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        }
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _check_root(path: Path, allowed_roots: Sequence[Path] | None) -> Path:
    resolved = Path(path).expanduser().resolve()
    if allowed_roots is not None and not within_roots(resolved, allowed_roots):
        raise DatasetError(f"dataset path {str(path)!r} is outside the allowed directories")
    return resolved


def _seeded_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted; test = round(TEST_FRACTION * n) random indices."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ----------------------------------------------------------------------------------- digits


def _digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _seeded_split(len(y), seed)
    return x[tr], y[tr], x[te], y[te], 10, {}, None


# ------------------------------------------------------------------------------ IDX (MNIST)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip'd): magic 0x0000 <dtype> <ndim>, ndim big-endian uint32
    sizes, then the data. Only unsigned bytes (0x08) are supported (all MNIST-style files)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path.name}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path.name} is not an IDX file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype != 0x08:
        raise DatasetError(f"{path.name}: IDX element type 0x{dtype:02x} unsupported (only 0x08 uint8)")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path.name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(dims)) if dims else 0
    if len(body) != expected:
        raise DatasetError(
            f"{path.name}: IDX header announces {dims} = {expected} bytes, file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"fashion-mnist: {stem}[.gz] not found in {directory}")


def _fashion(directory: Path):
    if not directory.is_dir():
        raise DatasetError(f"fashion-mnist directory not found: {directory}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"fashion-mnist {split}: images {images.shape} and labels {labels.shape} disagree"
            )
        arrays[split] = (
            torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    (trx, try_), (tex, tey) = arrays["train"], arrays["test"]
    return trx, try_, tex, tey, 10, {}, None


# ------------------------------------------------------------------------------------- npz


def _to_nchw(a: np.ndarray, name: str) -> Tensor:
    """uint8 0..255 or float 0..1, NHW / NHWC / NCHW -> float32 NCHW in [0, 1]."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] <= 4 < a.shape[1]:
            a = a.transpose(0, 3, 1, 2)
        elif a.shape[1] > 16:
            raise DatasetError(f"{name}: cannot tell the channel axis of shape {a.shape} (want NCHW or NHWC)")
    else:
        raise DatasetError(f"{name}: images must have 3 or 4 dimensions, got shape {a.shape}")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all() or x.min(initial=0.0) < 0.0 or x.max(initial=0.0) > 1.0:
            raise DatasetError(f"{name}: float images must be finite and within [0, 1] (uint8 for 0..255)")
    else:
        raise DatasetError(f"{name}: unsupported image dtype {a.dtype} (use uint8 or float)")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(a: np.ndarray, name: str, n: int) -> Tensor:
    if a.ndim != 1 or a.shape[0] != n:
        raise DatasetError(f"{name}: expected {n} labels of shape ({n},), got {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating) and
                                                    np.all(np.mod(a, 1) == 0))):
        raise DatasetError(f"{name}: labels must be integers, got dtype {a.dtype}")
    if n and a.min() < 0:
        raise DatasetError(f"{name}: labels must be >= 0")
    return torch.from_numpy(a.astype(np.int64))


def _npz(path: Path):
    if not path.is_file():
        raise DatasetError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except Exception as exc:  # BadZipFile, ValueError (object arrays), OSError
        raise DatasetError(f"cannot read npz {path.name} (pickled objects are refused): {exc}") from None
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in raw]
    if missing:
        have = ", ".join(raw) or "none"
        raise DatasetError(f"npz {path.name} lacks key(s) {', '.join(missing)}; it has {have}")
    trx = _to_nchw(raw["x_train"], "x_train")
    tex = _to_nchw(raw["x_test"], "x_test")
    if trx.shape[1:] != tex.shape[1:]:
        raise DatasetError(
            f"x_train {tuple(trx.shape[1:])} and x_test {tuple(tex.shape[1:])} differ in shape"
        )
    try_ = _labels(raw["y_train"], "y_train", trx.shape[0])
    tey = _labels(raw["y_test"], "y_test", tex.shape[0])
    k = max((int(t.max()) for t in (try_, tey) if len(t)), default=0) + 1
    extras = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in raw.items() if name not in need}
    return trx, try_, tex, tey, max(k, 2), extras, None


# ------------------------------------------------------------------------------ imagefolder


def _class_dirs(root: Path) -> list[Path]:
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: p.name)


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _presplit(root: Path) -> tuple[bool, dict[str, Path], Path | None]:
    """(has train/ and test/ (or val/) folders, the sub-folders by name, the test folder)."""
    sub = {p.name: p for p in _class_dirs(root)}
    test_dir = sub.get("test") or sub.get("val")
    return "train" in sub and test_dir is not None, sub, test_dir


def _imagefolder(root: Path, seed: int):
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DatasetError(f"imagefolder directory not found: {root}")
    presplit, sub, test_dir = _presplit(root)
    parts = {"train": sub["train"], "test": test_dir} if presplit else {"all": root}
    classes = sorted({c.name for d in parts.values() for c in _class_dirs(d)})
    if len(classes) < 2:
        raise DatasetError(f"imagefolder {root}: need at least 2 class sub-folders, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[Path, int]]] = {}
    for part, d in parts.items():
        files[part] = [(f, index[c.name]) for c in _class_dirs(d) for f in _image_files(c)]
        if not files[part]:
            raise DatasetError(f"imagefolder {d}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images: dict[str, list] = {}
    for part, items in files.items():
        images[part] = []
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    im.load()
                    images[part].append(im.copy())
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise DatasetError(f"imagefolder: cannot read image {f.relative_to(root)}: {exc}") from None
    every = [im for ims in images.values() for im in ims]
    grey = all(im.mode in ("1", "L", "I", "I;16", "F") for im in every)
    sizes = Counter(im.size for im in every)
    top = max(sizes.values())
    size = min(s for s, c in sizes.items() if c == top)  # most frequent (w, h); ties -> smallest

    def tensor(ims: list) -> Tensor:
        arr = []
        for im in ims:
            im = im.convert("L" if grey else "RGB")
            arr.append(np.asarray(im if im.size == size else im.resize(size, Image.BILINEAR)))
        a = np.stack(arr).astype(np.float32) / 255.0
        return torch.from_numpy(a[:, None] if grey else np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    if presplit:
        trx, tex = tensor(images["train"]), tensor(images["test"])
        try_ = torch.tensor([y for _, y in files["train"]], dtype=torch.int64)
        tey = torch.tensor([y for _, y in files["test"]], dtype=torch.int64)
    else:
        x = tensor(images["all"])
        y = torch.tensor([y for _, y in files["all"]], dtype=torch.int64)
        tr, te = _seeded_split(len(y), seed)
        trx, try_, tex, tey = x[tr], y[tr], x[te], y[te]
    return trx, try_, tex, tey, len(classes), {}, classes


# ------------------------------------------------------------------------------------ entry


def load_dataset(
    ref: str,
    *,
    seed: int = 0,
    allowed_roots: Sequence[Path] | None = None,
    train_subset: int | None = None,
    split_seed: int = SPLIT_SEED,
) -> DatasetSplit:
    """Resolve ``ref`` (see the module docstring) into a DatasetSplit. ``seed`` draws the training
    subset only; the train/test split uses ``split_seed``."""
    if not isinstance(ref, str) or not ref.strip():
        raise DatasetError(f"empty dataset reference; valid forms: {REF_FORMS}")
    ref = ref.strip()
    kind, _, arg = ref.partition(":")
    seeded_split = None
    if kind == "digits" and not arg:
        parts = _digits(split_seed)
        seeded_split = split_seed
    elif kind == "fashion-mnist":
        directory = _check_root(Path(arg), allowed_roots) if arg else DEFAULT_FASHION_DIR
        parts = _fashion(directory)
    elif kind in ("npz", "imagefolder"):
        if not arg:
            raise DatasetError(f"dataset reference {ref!r} needs a path: {kind}:PATH")
        path = _check_root(Path(arg), allowed_roots)
        parts = _npz(path) if kind == "npz" else _imagefolder(path, split_seed)
        if kind == "imagefolder" and not _presplit(path)[0]:
            seeded_split = split_seed
    else:
        raise DatasetError(f"unknown dataset reference {ref!r}; valid forms: {REF_FORMS}")
    trx, try_, tex, tey, num_classes, extras, classes = parts
    if trx.shape[0] == 0 or tex.shape[0] == 0:
        raise DatasetError(f"dataset {ref!r} has an empty train or test split")
    train_indices = None
    if train_subset is not None:
        if train_subset < 1:
            raise DatasetError(f"train_subset must be >= 1, got {train_subset}")
        if train_subset < trx.shape[0]:
            keep = np.sort(np.random.default_rng(seed + 1).permutation(trx.shape[0])[:train_subset])
            train_indices = torch.from_numpy(keep.astype(np.int64))
            n_source = trx.shape[0]
            trx, try_ = trx[train_indices], try_[train_indices]
            extras = {  # keep per-training-sample extras (e.g. variants_train) aligned
                k: v[train_indices] if k.endswith("_train") and v.ndim and v.shape[0] == n_source else v
                for k, v in extras.items()
            }
    arrays = {"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey}
    arrays.update({f"extra/{k}": v for k, v in extras.items()})
    if train_indices is not None:
        arrays["train_indices"] = train_indices
    return DatasetSplit(
        train_x=trx,
        train_y=try_,
        test_x=tex,
        test_y=tey,
        num_classes=int(num_classes),
        in_channels=int(trx.shape[1]),
        ref=ref,
        sha256=manifest_sha256(arrays),
        extras=extras,
        train_indices=train_indices,
        classes=classes,
        split_seed=seeded_split,
    )
