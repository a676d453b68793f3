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
                            frequent size and are grey if every image is grey, both judged on up to
                            SIZE_PROBE files evenly spaced over the sorted listing.
    imagefolder:s3://BUCKET/PREFIX
                            the same layout as objects under PREFIX/ of an S3-compatible store,
                            read through the injected ``objects`` (core.objectstore.ObjectStore):
                            one listing, ranged GETs of up to SIZE_PROBE headers, then one GET per
                            image when a batch reads it; the same split, classes and sha256 as the
                            same folder on disk.
Images come back as float32 (N, C, H, W) in [0, 1], labels as int64 (N,): digits as tensors, every
other source as a core.datasets.ImageSource that reads rows on demand (memory-mapped npz members and
raw IDX files, uint8 kept in memory for gzip'd IDX and compressed npz members, image files decoded per
row), so no split is ever held as float32. ``resize`` / ``crop`` (core.datasets.Geometry,
preprocess.resize / crop) apply to every image first.

sha256: the manifest of the float32 tensors (computed chunk by chunk, identical for every source of
the same data); for an imagefolder the tensor's entry hashes the file listing (relative path and byte
size per row) instead of the pixels (core.datasets.FileImages.manifest_entry), so loading a folder
reads no image beyond the SIZE_PROBE headers.

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
import io
import json
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.datasets import ArrayImages, FileImages, Geometry, ImageSource, ObjectImages, SubsetImages
from core.errors import DatasetError
from core.objectstore import ObjectStore, S3Location, is_s3_url, parse_s3_url
from core.paths import within_roots

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the fixed seed of the digits / imagefolder train/test split (never the job seed)
REF_FORMS = "digits, fashion-mnist[:DIR], npz:PATH, imagefolder:PATH, imagefolder:s3://BUCKET/PREFIX"
SIZE_PROBE = 512  # imagefolder: files whose headers decide the common size and colour
OBJECT_PROBE_BYTES = 64 * 1024  # bytes of an object read for its header (ranged GET)
Images = Tensor | ImageSource


@dataclass
class DatasetSplit:
    train_x: Images
    train_y: Tensor
    test_x: Images
    test_y: Tensor
    num_classes: int
    in_channels: int
    ref: str
    sha256: str
    extras: dict[str, Tensor] = field(default_factory=dict)
    train_indices: Tensor | None = None  # source indices of the kept training samples (train_subset)
    classes: list[str] | None = None  # class names where the source has them (imagefolder)
    split_seed: int | None = None  # seed of the train/test split; None: the source's own split
    geometry: Geometry | None = None  # resize / crop applied to every image (preprocess)

    def describe(self) -> dict:
        """JSON-able summary for certificates and metrics."""
        out = {
            "ref": self.ref,
            "sha256": self.sha256,
            "train": int(self.train_x.shape[0]),
            "test": int(self.test_x.shape[0]),
            "shape": list(self.train_x.shape[1:]),
            "num_classes": self.num_classes,
            "split_seed": self.split_seed,
        }
        if self.geometry is not None and self.geometry.active:
            out["geometry"] = self.geometry.describe()
        return out


def manifest_sha256(arrays: dict[str, Images]) -> str:
    """sha256 of the JSON manifest {name: {dtype, shape, sha256 of the C-contiguous bytes}},
    names sorted: equal data gives equal hashes whatever the source format (an ImageSource
    describes itself: core.datasets.ImageSource.manifest_entry)."""
    manifest = {}
    for name in sorted(arrays):
        if isinstance(arrays[name], ImageSource):
            manifest[name] = arrays[name].manifest_entry()
            continue
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


def _folder_splits(files: dict[str, list[tuple[str, int]]], presplit: bool, seed: int,
                   source: Callable[[list[tuple[str, int]]], Any]) -> tuple[Any, Any]:
    """(train, test) of an imagefolder's (file, label) lists, each made by source(items): its own
    train/ and test/ parts, or a seeded split (`_seeded_split`) of the one "all" part."""
    if presplit:
        return source(files["train"]), source(files["test"])
    tr, te = _seeded_split(len(files["all"]), seed)
    return tuple(source([files["all"][i] for i in part]) for part in (tr, te))  # type: ignore[return-value]


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
    sizes, then the data. Only unsigned bytes (0x08) are supported (all MNIST-style files). A raw
    file comes back memory-mapped (np.memmap, nothing read beyond the header); a gzip'd one is
    decompressed into memory as uint8."""
    gz = path.suffix == ".gz"
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                data = f.read()
            head, size = data[: 4 + 4 * 255], len(data)
        else:
            with open(path, "rb") as f:
                head = f.read(4 + 4 * 255)
            size = path.stat().st_size
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path.name}: {exc}") from None
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DatasetError(f"{path.name} is not an IDX file (bad magic number)")
    dtype, ndim = head[2], head[3]
    if dtype != 0x08:
        raise DatasetError(f"{path.name}: IDX element type 0x{dtype:02x} unsupported (only 0x08 uint8)")
    if len(head) < 4 + 4 * ndim:
        raise DatasetError(f"{path.name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if size - offset != expected:
        raise DatasetError(
            f"{path.name}: IDX header announces {dims} = {expected} bytes, file holds {size - offset}"
        )
    if gz:
        return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    if expected == 0:
        return np.zeros(dims, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(dims))


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"fashion-mnist: {stem}[.gz] not found in {directory}")


def _fashion(directory: Path, geometry: Geometry | None):
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
        arrays[split] = (ArrayImages(images, f"fashion-mnist {split}", geometry),
                         torch.from_numpy(labels.astype(np.int64)))
    (trx, try_), (tex, tey) = arrays["train"], arrays["test"]
    return trx, try_, tex, tey, 10, {}, None


# ------------------------------------------------------------------------------------- npz


def _labels(a: np.ndarray, name: str, n: int) -> Tensor:
    if a.ndim != 1 or a.shape[0] != n:
        raise DatasetError(f"{name}: expected {n} labels of shape ({n},), got {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating) and
                                                    np.all(np.mod(a, 1) == 0))):
        raise DatasetError(f"{name}: labels must be integers, got dtype {a.dtype}")
    if n and a.min() < 0:
        raise DatasetError(f"{name}: labels must be >= 0")
    return torch.from_numpy(a.astype(np.int64))


def _npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member: np.memmap into the zip when stored uncompressed (the data offset is the
    local file header's end plus the .npy header), read into memory when compressed. Object
    arrays (pickles) are refused."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{info.filename} holds Python objects")
        if info.compress_type != zipfile.ZIP_STORED or 0 in shape:
            return np.lib.format.read_array(zf.open(info), allow_pickle=False)
        npy_header = f.tell()
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + npy_header
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {i.filename[:-4]: _npz_member(path, zf, i) for i in zf.infolist()
                    if i.filename.endswith(".npy")}
    except Exception as exc:  # BadZipFile, ValueError (object arrays), OSError
        raise DatasetError(f"cannot read npz {path.name} (pickled objects are refused): {exc}") from None


def _npz(path: Path, geometry: Geometry | None):
    if not path.is_file():
        raise DatasetError(f"npz file not found: {path}")
    raw = _npz_arrays(path)
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in raw]
    if missing:
        have = ", ".join(raw) or "none"
        raise DatasetError(f"npz {path.name} lacks key(s) {', '.join(missing)}; it has {have}")
    trx = ArrayImages(raw["x_train"], "x_train", geometry)
    tex = ArrayImages(raw["x_test"], "x_test", geometry)
    if trx.shape[1:] != tex.shape[1:]:
        raise DatasetError(
            f"x_train {tuple(trx.shape[1:])} and x_test {tuple(tex.shape[1:])} differ in shape"
        )
    trx.check_range("x_train")
    tex.check_range("x_test")
    try_ = _labels(np.asarray(raw["y_train"]), "y_train", trx.shape[0])
    tey = _labels(np.asarray(raw["y_test"]), "y_test", tex.shape[0])
    k = max((int(t.max()) for t in (try_, tey) if len(t)), default=0) + 1
    extras = {name: torch.from_numpy(np.array(a)) for name, a in raw.items() if name not in need}
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


def _probe(files: list[str], open_: Callable[[str], Any]) -> tuple[tuple[int, int], bool]:
    """(most frequent (w, h), ties -> smallest; grey) over up to SIZE_PROBE files evenly spaced over
    `files` (headers only; open_(rel) gives what PIL opens)."""
    from PIL import Image, UnidentifiedImageError

    step = max(1, len(files) // SIZE_PROBE)
    sizes: Counter = Counter()
    grey = True
    for rel in files[::step][:SIZE_PROBE]:
        try:
            with Image.open(open_(rel)) as im:
                sizes[im.size] += 1
                grey = grey and im.mode in ("1", "L", "I", "I;16", "F")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"imagefolder: cannot read image {rel}: {exc}") from None
    top = max(sizes.values())
    return min(s for s, c in sizes.items() if c == top), grey


def _imagefolder(root: Path, seed: int, geometry: Geometry | None):
    """Split lists of relative paths (seeded 80/20 or the folders' own), decoded per row."""
    if not root.is_dir():
        raise DatasetError(f"imagefolder directory not found: {root}")
    presplit, sub, test_dir = _presplit(root)
    parts = {"train": sub["train"], "test": test_dir} if presplit else {"all": root}
    classes = sorted({c.name for d in parts.values() for c in _class_dirs(d)})
    if len(classes) < 2:
        raise DatasetError(f"imagefolder {root}: need at least 2 class sub-folders, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[str, int]]] = {}
    for part, d in parts.items():
        files[part] = [
            (str(f.relative_to(root)), index[c.name]) for c in _class_dirs(d) for f in _image_files(c)
        ]
        if not files[part]:
            raise DatasetError(f"imagefolder {d}: no images ({', '.join(IMAGE_SUFFIXES)})")
    size, grey = _probe([f for items in files.values() for f, _ in items], lambda rel: root / rel)

    def source(items: list[tuple[str, int]]) -> tuple[FileImages, Tensor]:
        return (FileImages(root, [f for f, _ in items], size, grey, geometry),
                torch.tensor([y for _, y in items], dtype=torch.int64))

    (trx, try_), (tex, tey) = _folder_splits(files, presplit, seed, source)
    return trx, try_, tex, tey, len(classes), {}, classes


# ---------------------------------------------------------------- imagefolder in an object store


def _object_tree(listing: dict[str, int], part: str) -> dict[str, list[str]]:
    """{class folder: its image files (relative to the root), sorted as paths} directly under the
    folder `part` ("" or "train/"...) of a listing of relative keys, as _class_dirs/_image_files
    read a local folder (hidden class folders skipped)."""
    tree: dict[str, list[str]] = {}
    for rel in listing:
        if not rel.startswith(part):
            continue
        head, sep, tail = rel[len(part):].partition("/")
        if not sep or not tail or head.startswith("."):
            continue
        files = tree.setdefault(head, [])
        if PurePosixPath(tail).suffix.lower() in IMAGE_SUFFIXES:
            files.append(rel)
    return {c: sorted(fs, key=PurePosixPath) for c, fs in sorted(tree.items())}


def _object_header(store: ObjectStore, loc: S3Location, rel: str) -> io.BytesIO:
    """The first OBJECT_PROBE_BYTES of an object (ranged GET), or the whole object when PIL cannot
    read the image header from them."""
    from PIL import Image

    head = store.get(loc.bucket, loc.prefix + rel, OBJECT_PROBE_BYTES)
    if len(head) >= OBJECT_PROBE_BYTES:
        try:
            with Image.open(io.BytesIO(head)):
                pass
        except Exception:  # noqa: BLE001 - a header beyond the first bytes (large EXIF): read it all
            head = store.get(loc.bucket, loc.prefix + rel)
    return io.BytesIO(head)


def _imagefolder_objects(url: str, store: ObjectStore, seed: int, geometry: Geometry | None):
    """_imagefolder over the objects under s3://BUCKET/PREFIX: one listing, header reads (ranged
    GETs) of up to SIZE_PROBE images, rows fetched when read (core.datasets.ObjectImages)."""
    loc = parse_s3_url(url)
    listing = {key[len(loc.prefix):]: int(size) for key, size in store.list(loc.bucket, loc.prefix)
               if key.startswith(loc.prefix) and not key.endswith("/")}
    if not listing:
        raise DatasetError(f"imagefolder {url}: no objects under this prefix")
    tops = {rel.split("/", 1)[0] for rel in listing if "/" in rel}
    test_part = "test" if "test" in tops else "val" if "val" in tops else None
    presplit = "train" in tops and test_part is not None
    parts = {"train": "train/", "test": f"{test_part}/"} if presplit else {"all": ""}
    trees = {part: _object_tree(listing, prefix) for part, prefix in parts.items()}
    classes = sorted({c for tree in trees.values() for c in tree})
    if len(classes) < 2:
        raise DatasetError(f"imagefolder {url}: need at least 2 class folders, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    files = {part: [(f, index[c]) for c, fs in tree.items() for f in fs] for part, tree in trees.items()}
    for part, items in files.items():
        if not items:
            raise DatasetError(f"imagefolder {url}{parts[part]}: no images ({', '.join(IMAGE_SUFFIXES)})")
    size, grey = _probe([f for items in files.values() for f, _ in items],
                        lambda rel: _object_header(store, loc, rel))

    def source(items: list[tuple[str, int]]) -> tuple[ObjectImages, Tensor]:
        names = [f for f, _ in items]
        return (ObjectImages(store, loc, names, [listing[f] for f in names], size, grey, geometry),
                torch.tensor([y for _, y in items], dtype=torch.int64))

    (trx, try_), (tex, tey) = _folder_splits(files, presplit, seed, source)
    return (trx, try_, tex, tey, len(classes), {}, classes), (None if presplit else seed)


# ------------------------------------------------------------------------------------ entry


def _resolve(ref: str, kind: str, arg: str, allowed_roots: Sequence[Path] | None, split_seed: int,
             geometry: Geometry | None, objects: ObjectStore | None) -> tuple[tuple, int | None]:
    """(the source's parts, the seed of its split or None)."""
    if kind == "digits" and not arg:
        parts = _digits(split_seed)
        if geometry is not None:
            parts = (ArrayImages(parts[0].numpy(), "digits", geometry), parts[1],
                     ArrayImages(parts[2].numpy(), "digits", geometry), *parts[3:])
        return parts, split_seed
    if kind == "fashion-mnist":
        directory = _check_root(Path(arg), allowed_roots) if arg else DEFAULT_FASHION_DIR
        return _fashion(directory, geometry), None
    if kind == "imagefolder" and is_s3_url(arg):
        if objects is None:
            raise DatasetError(f"dataset {ref!r}: no object store is configured to read s3:// folders")
        return _imagefolder_objects(arg, objects, split_seed, geometry)
    if kind in ("npz", "imagefolder"):
        if not arg:
            raise DatasetError(f"dataset reference {ref!r} needs a path: {kind}:PATH")
        path = _check_root(Path(arg), allowed_roots)
        if kind == "npz":
            return _npz(path, geometry), None
        parts = _imagefolder(path, split_seed, geometry)
        return parts, None if _presplit(path)[0] else split_seed
    raise DatasetError(f"unknown dataset reference {ref!r}; valid forms: {REF_FORMS}")


def _subset(x: Images, idx: Tensor) -> Images:
    return x[idx] if isinstance(x, Tensor) else SubsetImages(x, idx)


def load_dataset(
    ref: str,
    *,
    seed: int = 0,
    allowed_roots: Sequence[Path] | None = None,
    train_subset: int | None = None,
    split_seed: int = SPLIT_SEED,
    resize: int | None = None,
    crop: int | None = None,
    objects: ObjectStore | None = None,
) -> DatasetSplit:
    """Resolve ``ref`` (see the module docstring) into a DatasetSplit. ``seed`` draws the training
    subset only; the train/test split uses ``split_seed``. ``resize`` / ``crop``: Geometry.
    ``objects`` reads ``imagefolder:s3://...`` references (None: they are refused)."""
    if not isinstance(ref, str) or not ref.strip():
        raise DatasetError(f"empty dataset reference; valid forms: {REF_FORMS}")
    ref = ref.strip()
    kind, _, arg = ref.partition(":")
    geometry = Geometry(resize, crop) if resize is not None or crop is not None else None
    parts, seeded_split = _resolve(ref, kind, arg, allowed_roots, split_seed, geometry, objects)
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
            trx, try_ = _subset(trx, train_indices), try_[train_indices]
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
        geometry=geometry,
    )
