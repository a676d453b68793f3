"""Image sources: a split's images read on demand, one batch at a time, never the whole split.

An ImageSource stands for the float32 (N, C, H, W) tensor in [0, 1] of a split and offers what its
consumers use of a tensor: ``len``, ``shape``, ``dtype``, ``device`` and indexing (``x[i]``,
``x[a:b]``, ``x[idx]`` with an index tensor / array / list, ``x[i, c]``, ``x.index_select(0, idx)``),
each returning a float32 CPU tensor of just those rows. Sources:

    ArrayImages     a numpy array (uint8 0..255 or float 0..1; NCHW, NHWC or NHW) in memory or
                    memory-mapped (np.memmap: npz members stored uncompressed, raw IDX files);
                    rows are converted per batch: uint8 -> float32 / 255.0 (the same float32
                    division the in-memory path did, so values are bit-identical).
    FileImages      image files decoded with PIL per row (imagefolder): convert to "L" / "RGB",
                    then either the fixed `size` (bilinear) or the `Geometry` (resize + crop).
    ObjectImages    the same from objects of an object store (imagefolder:s3://...), one GET per
                    row read, through an injected core.objectstore.ObjectStore.
    SubsetImages    rows `idx` of another source (train_subset).
    AugmentedImages a source plus q rows T(x[pick], delta=1, index=pick) computed when read
                    (core.training.augment_with_transform for streamed sources).

`batch_stream` feeds training loops: for a source that decodes files through a torch DataLoader
whose worker processes decode the next batches while the model trains (pinned memory when CUDA is
present), for a tensor or an array source by plain indexing (unchanged results).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.errors import DatasetError
from core.objectstore import ObjectStore, S3Location

HASH_CHUNK = 2048  # rows per chunk when a source's content is hashed
MAX_LOADER_WORKERS = 4
FETCH_THREADS = 8  # concurrent object GETs within one batch (ObjectImages)
FORWARD_VALUES = 1 << 21  # input values (batch x C x H x W) of one inference forward pass at most


@dataclass(frozen=True)
class Geometry:
    """Resize + center crop applied to every image before anything else (preprocess.resize/crop):
    resize R scales the shorter side to R pixels (bilinear, antialiased, torchvision semantics);
    crop C keeps the central C x C pixels (default: R). None/None: the images as they are."""

    resize: int | None = None
    crop: int | None = None

    @property
    def active(self) -> bool:
        return self.resize is not None or self.crop is not None

    @property
    def side(self) -> int | None:
        """The square output side (crop, else resize), None when inactive."""
        return self.crop if self.crop is not None else self.resize

    def describe(self) -> dict[str, int | None]:
        return {"resize": self.resize, "crop": self.crop}

    def pil(self, im: Any) -> Any:
        """The geometry on one PIL image (torchvision.transforms.functional)."""
        from torchvision.transforms import functional as tf

        if self.resize is not None:
            im = tf.resize(im, [self.resize], interpolation=tf.InterpolationMode.BILINEAR, antialias=True)
        return tf.center_crop(im, [self.side]) if self.side is not None else im

    def tensor(self, x: Tensor) -> Tensor:
        """The geometry on a float batch (B, C, H, W)."""
        from torchvision.transforms.v2 import functional as tf

        if self.resize is not None:
            x = tf.resize(x, [self.resize], interpolation=tf.InterpolationMode.BILINEAR, antialias=True)
        return tf.center_crop(x, [self.side]) if self.side is not None else x


def forward_batch(requested: int, chw: Sequence[int]) -> int:
    """The inference batch for images of shape chw: `requested`, capped at FORWARD_VALUES input
    values (all 500 of 3 x 32 x 32 or 1 x 28 x 28, 27 of 3 x 160 x 160, 13 of 3 x 224 x 224), so the
    activation memory of evaluation, BatchNorm re-estimation and certification stays bounded
    whatever the image size."""
    per = int(np.prod([int(v) for v in chw])) if len(chw) else 1
    return max(1, min(int(requested), FORWARD_VALUES // max(1, per)))


def _as_indices(key: Any, n: int) -> np.ndarray:
    """A slice / index tensor / array / list / bool mask -> int64 row indices in [0, n)."""
    if isinstance(key, slice):
        return np.arange(n, dtype=np.int64)[key]
    if isinstance(key, Tensor):
        key = key.detach().cpu().numpy()
    idx = np.asarray(key)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
        return np.flatnonzero(idx)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"rows must be indexed by integers, got {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx)


class ImageSource:
    """A split's images as float32 (N, C, H, W) in [0, 1], read on demand (module docstring)."""

    dtype = torch.float32
    device = torch.device("cpu")
    decodes = False  # reading a row decodes a file: worth DataLoader worker processes

    def __init__(self, n: int, chw: Sequence[int]) -> None:
        self.n = int(n)
        self.chw = tuple(int(v) for v in chw)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.chw))

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: np.ndarray) -> Tensor:
        """float32 (len(idx), C, H, W) of rows idx (int64, in range), in that order."""
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, tuple):
            head = self[key[0]]
            rest = key[1:]
            return head[rest] if isinstance(key[0], (int, np.integer)) else head[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return self.rows(_as_indices([int(key)], self.n))[0]
        return self.rows(_as_indices(key, self.n))

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("an ImageSource selects rows only (dim 0)")
        return self[index]

    def chunks(self, size: int = HASH_CHUNK) -> Iterator[Tensor]:
        """The rows in order, `size` at a time."""
        for i in range(0, self.n, size):
            yield self.rows(np.arange(i, min(self.n, i + size), dtype=np.int64))

    def manifest_entry(self) -> dict[str, Any]:
        """{dtype, shape, sha256} exactly as core.data.manifest_sha256 describes the float32 tensor
        (the bytes hashed chunk by chunk, which gives the same digest)."""
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk.contiguous().numpy().tobytes())
        return {"dtype": "float32", "shape": list(self.shape), "sha256": h.hexdigest()}


def array_layout(a: np.ndarray, name: str) -> str:
    """'nhw', 'nhwc' or 'nchw' of an image array (uint8 0..255 or float 0..1)."""
    if a.ndim == 3:
        return "nhw"
    if a.ndim == 4:
        if a.shape[-1] <= 4 < a.shape[1]:
            return "nhwc"
        if a.shape[1] > 16:
            raise DatasetError(f"{name}: cannot tell the channel axis of shape {a.shape} (want NCHW or NHWC)")
        return "nchw"
    raise DatasetError(f"{name}: images must have 3 or 4 dimensions, got shape {a.shape}")


class ArrayImages(ImageSource):
    """Rows of a numpy array (in memory or np.memmap), converted to float32 NCHW per batch."""

    def __init__(self, array: np.ndarray, name: str = "images", geometry: Geometry | None = None) -> None:
        self.array, self.layout = array, array_layout(array, name)
        self.geometry = geometry if geometry is not None and geometry.active else None
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise DatasetError(f"{name}: unsupported image dtype {array.dtype} (use uint8 or float)")
        s = array.shape
        chw = {"nhw": (1, *s[1:3]), "nhwc": (*s[3:4], *s[1:3]), "nchw": s[1:4]}[self.layout]
        if self.geometry is not None:
            side = self.geometry.side
            chw = (chw[0], side, side) if side is not None else chw
            if side is None:  # resize only of a non-square image: ask the geometry for the size
                chw = tuple(self.geometry.tensor(torch.zeros(1, *chw)).shape[1:])
        super().__init__(s[0], chw)

    def rows(self, idx: np.ndarray) -> Tensor:
        a = self.array[idx]
        if self.layout == "nhw":
            a = a[:, None]
        elif self.layout == "nhwc":
            a = a.transpose(0, 3, 1, 2)
        x = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x if self.geometry is None else self.geometry.tensor(x).contiguous()

    def check_range(self, name: str) -> None:
        """Float images must be finite and within [0, 1] (checked chunk by chunk)."""
        if self.array.dtype == np.uint8:
            return
        for i in range(0, self.n, HASH_CHUNK):
            a = np.asarray(self.array[i : i + HASH_CHUNK], dtype=np.float32)
            if not np.isfinite(a).all() or a.min(initial=0.0) < 0.0 or a.max(initial=0.0) > 1.0:
                raise DatasetError(
                    f"{name}: float images must be finite and within [0, 1] (uint8 for 0..255)"
                )


class FileImages(ImageSource):
    """Image files under `root` decoded per row with PIL: converted to grey ("L") or "RGB", then
    resized (bilinear) to `size` (w, h) when they differ, or given `geometry` instead."""

    decodes = True

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        size: tuple[int, int],
        grey: bool,
        geometry: Geometry | None = None,
    ) -> None:
        self.root, self.files, self.size, self.grey = Path(root), list(files), tuple(size), grey
        self.geometry = geometry if geometry is not None and geometry.active else None
        c = 1 if grey else 3
        if self.geometry is not None and self.geometry.side is not None:
            hw = (self.geometry.side, self.geometry.side)
        else:
            hw = (size[1], size[0])
        super().__init__(len(self.files), (c, *hw))

    def open(self, i: int) -> Any:
        """What PIL opens for row i: the file's path (ObjectImages: the object's bytes)."""
        return self.root / self.files[i]

    def byte_size(self, i: int) -> int:
        """The byte size of row i's file (for the manifest)."""
        return (self.root / self.files[i]).stat().st_size

    def load(self, i: int) -> np.ndarray:
        """Row i as uint8 (H, W) or (H, W, 3)."""
        return self.decode(self.open(i), self.files[i])

    def decode(self, src: Any, rel: str) -> np.ndarray:
        """The image `src` (a path or a binary file object) of row `rel` as uint8 (H, W) or (H, W, 3)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(src) as im:
                im = im.convert("L" if self.grey else "RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"imagefolder: cannot read image {rel}: {exc}") from None
        if self.geometry is not None:
            im = self.geometry.pil(im)
        elif im.size != self.size:
            im = im.resize(self.size, Image.BILINEAR)
        a = np.asarray(im)
        if a.shape[:2] != self.chw[1:]:
            raise DatasetError(
                f"imagefolder: {rel} is {a.shape[1]}x{a.shape[0]} after resizing, not "
                f"{self.chw[2]}x{self.chw[1]} (give preprocess.crop for mixed aspect ratios)"
            )
        return a

    def load_many(self, idx: np.ndarray) -> list[np.ndarray]:
        """load(i) for each row of idx, in order."""
        return [self.load(int(i)) for i in idx]

    def rows(self, idx: np.ndarray) -> Tensor:
        if len(idx) == 0:
            return torch.empty((0, *self.chw), dtype=torch.float32)
        a = np.stack(self.load_many(idx)).astype(np.float32) / 255.0
        a = a[:, None] if self.grey else a.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(a))

    def subset(self, idx: np.ndarray) -> FileImages:
        """The same kind of source over rows idx only."""
        return FileImages(self.root, [self.files[i] for i in idx], self.size, self.grey, self.geometry)

    def manifest_entry(self) -> dict[str, Any]:
        """{dtype, shape, listing_sha256}: the sha256 of the file listing (relative path and byte
        size of every row, in order, with the size / colour / geometry) instead of the pixels, so
        that loading a folder costs one stat per file, not a decode."""
        h = hashlib.sha256(repr((self.size, self.grey, self.geometry)).encode())
        for i, rel in enumerate(self.files):
            h.update(f"{rel}\0{self.byte_size(i)}\n".encode())
        return {"dtype": "float32", "shape": list(self.shape), "listing_sha256": h.hexdigest()}


class ObjectImages(FileImages):
    """Image objects of an object store (core.objectstore.ObjectStore) under `location`, fetched
    when a row is read (one GET per image, up to FETCH_THREADS at once within a batch; nothing is
    downloaded ahead or kept) and decoded as FileImages does. `files` are the keys relative to the
    location's prefix, `sizes` their byte sizes from the listing (the manifest hashes path and size
    per row, as for a local folder, so the same folder gives the same dataset sha256 in both)."""

    def __init__(
        self,
        store: ObjectStore,
        location: S3Location,
        files: Sequence[str],
        sizes: Sequence[int],
        size: tuple[int, int],
        grey: bool,
        geometry: Geometry | None = None,
    ) -> None:
        super().__init__(Path(), files, size, grey, geometry)
        if len(sizes) != len(self.files):
            raise ValueError("one size per file")
        self.store, self.location, self.sizes = store, location, [int(v) for v in sizes]

    def open(self, i: int) -> Any:
        return io.BytesIO(self.store.get(self.location.bucket, self.location.prefix + self.files[i]))

    def byte_size(self, i: int) -> int:
        return self.sizes[i]

    def load_many(self, idx: np.ndarray) -> list[np.ndarray]:
        if len(idx) <= 1:
            return super().load_many(idx)
        with ThreadPoolExecutor(min(FETCH_THREADS, len(idx))) as pool:
            return list(pool.map(self.load, (int(i) for i in idx)))

    def subset(self, idx: np.ndarray) -> ObjectImages:
        return ObjectImages(self.store, self.location, [self.files[i] for i in idx],
                            [self.sizes[i] for i in idx], self.size, self.grey, self.geometry)


class SubsetImages(ImageSource):
    """Rows `idx` of `base`, in that order."""

    def __init__(self, base: ImageSource, idx: Tensor | np.ndarray) -> None:
        self.base, self.idx = base, _as_indices(idx, len(base))
        self.decodes = base.decodes
        super().__init__(len(self.idx), base.chw)

    def rows(self, idx: np.ndarray) -> Tensor:
        return self.base.rows(self.idx[idx])

    def manifest_entry(self) -> dict[str, Any]:
        if isinstance(self.base, FileImages):
            return self.base.subset(self.idx).manifest_entry()
        return super().manifest_entry()


class AugmentedImages(ImageSource):
    """`base` followed by q rows T(base[pick], delta=1, index=pick), transformed when read."""

    def __init__(self, base: ImageSource, transform: Any, pick: Tensor) -> None:
        self.base, self.transform = base, transform
        self.pick = pick.detach().cpu().numpy().astype(np.int64)
        self.decodes = base.decodes
        super().__init__(len(base) + len(self.pick), base.chw)

    @torch.no_grad()
    def rows(self, idx: np.ndarray) -> Tensor:
        out = torch.empty((len(idx), *self.chw), dtype=torch.float32)
        orig = idx < len(self.base)
        if orig.any():
            out[torch.from_numpy(orig)] = self.base.rows(idx[orig])
        if not orig.all():
            src = self.pick[idx[~orig] - len(self.base)]
            xb = self.base.rows(src)
            index = torch.from_numpy(src)
            xt = self.transform(xb, torch.ones(len(src)), index=index)
            out[torch.from_numpy(~orig)] = xt.to(torch.float32)
        return out


def materialize(x: Tensor | ImageSource) -> Tensor:
    """The whole split as one tensor (small data and tests only)."""
    return x if isinstance(x, Tensor) else x[:]


class _Batches(torch.utils.data.Dataset):
    """dataset[idx] = (idx, x[idx], y[idx]) for a whole index batch (DataLoader batch_size=None)."""

    def __init__(self, x: ImageSource, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return idx, self.x[idx], self.y[idx]


def loader_workers() -> int:
    """DataLoader worker processes for streamed sources: CARCERT_LOADER_WORKERS, else
    min(MAX_LOADER_WORKERS, CPUs - 1), at least 1."""
    env = os.environ.get("CARCERT_LOADER_WORKERS")
    if env is not None and env.strip().isdigit():
        return int(env)
    return max(1, min(MAX_LOADER_WORKERS, (os.cpu_count() or 2) - 1))


def batch_stream(
    x: Tensor | ImageSource, y: Tensor, batches: Sequence[Tensor], *, pin_memory: bool = False
) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """(idx, x[idx], y[idx]) for each index batch, in order. A tensor or an array source (in memory
    or memory-mapped: converting a batch is cheap) is indexed directly; a source that decodes files
    goes through a DataLoader with `loader_workers()` processes (each decodes whole batches; up to
    2 batches each are prefetched) and pinned memory if asked."""
    workers = loader_workers() if isinstance(x, ImageSource) and x.decodes else 0
    if workers == 0:
        return ((idx, x[idx], y[idx]) for idx in batches)
    return torch.utils.data.DataLoader(
        _Batches(x, y),
        batch_size=None,
        sampler=list(batches),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2,
        persistent_workers=False,
    )
