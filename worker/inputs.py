"""Turn a job spec's references into local paths the pipeline can open.

"artifact:ID" in model.weights / model.program / mask / transform.encoder / transform.decoder -> a copy of the
blob under <job dir>/inputs/ keeping the uploaded file's extension (the loaders pick the format by
it). "artifact:ID" as dataset -> "npz:<path>" for a .npz upload, or, for a .zip / .tar(.gz|.bz2|.xz)
archive of class folders, "imagefolder:<dir>" after a safe extraction (regular files and folders
only, no absolute paths, no "..", no links, byte and file-count limits counted while extracting).
Plain paths (CLI-style references) are only accepted under settings.data_roots;
"imagefolder:s3://..." only inside the artifact bucket's dataset folder (store.objects), and stays as
it is: the job reads those images object by object.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from core.errors import DatasetError, InvalidInput
from core.objectstore import is_s3_url
from core.paths import within_roots
from core.spec import JobSpec
from store.artifacts import ArtifactStore, copy_to, get_artifact
from store.objects import check_dataset_url
from store.settings import Settings

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_IGNORED = {"__MACOSX", ".DS_Store"}


def _suffix(filename: str) -> str:
    name = filename.lower()
    for suf in ARCHIVE_SUFFIXES:
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def _member_path(dest: Path, name: str) -> Path:
    """The extraction target of an archive member, refusing anything that would leave `dest`."""
    clean = name.replace("\\", "/")
    pure = PurePosixPath(clean)
    if not clean or pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
        raise DatasetError(f"archive member {name!r} has an unsafe path")
    target = (dest / pure).resolve()
    if not within_roots(target, [dest]):
        raise DatasetError(f"archive member {name!r} escapes the extraction folder")
    return target


class _Budget:
    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.bytes_left, self.files_left = max_bytes, max_files
        self.max_bytes, self.max_files = max_bytes, max_files

    def file(self) -> None:
        self.files_left -= 1
        if self.files_left < 0:
            raise DatasetError(f"archive holds more than {self.max_files} files")

    def take(self, n: int) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise DatasetError(f"archive expands to more than {self.max_bytes} bytes")


def _copy_stream(fin, target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := fin.read(1 << 20):
            budget.take(len(chunk))
            out.write(chunk)


def safe_extract(archive: Path, dest: Path, *, max_bytes: int, max_files: int) -> Path:
    """Extract a zip or tar archive into `dest` safely (see module docstring); returns `dest`.
    Raises DatasetError on an unsafe member, a link or device, or when a limit is passed (sizes are
    counted on the decompressed bytes actually written, not on the headers)."""
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_bytes, max_files)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DatasetError(f"archive member {info.filename!r} is a symbolic link")
                target = _member_path(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                budget.file()
                with zf.open(info) as fin:
                    _copy_stream(fin, target, budget)
        return dest
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115
    except tarfile.TarError as exc:
        raise DatasetError("dataset archive is neither a zip nor a tar archive") from exc
    with tf:
        for member in tf:
            target = _member_path(dest, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                raise DatasetError(f"archive member {member.name!r} is not a regular file or folder")
            budget.file()
            fin = tf.extractfile(member)
            if fin is None:
                raise DatasetError(f"archive member {member.name!r} cannot be read")
            with fin:
                _copy_stream(fin, target, budget)
    return dest


def image_root(dest: Path) -> Path:
    """Descend through single wrapping folders (archive.zip/mydata/<class>/...) to the folder
    whose subfolders are the classes."""
    root = dest
    while True:
        entries = [p for p in root.iterdir() if p.name not in _IGNORED and not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            sub = dirs[0]
            if any(q.is_dir() for q in sub.iterdir()):
                root = sub
                continue
        return root


class InputResolver:
    """Resolves the references of one job of `tenant` into files under `inputs_dir`."""

    def __init__(self, s: Session, tenant: str, store: ArtifactStore, inputs_dir: Path, settings: Settings):
        self.s, self.tenant, self.store, self.dir, self.settings = s, tenant, store, inputs_dir, settings
        self.dir.mkdir(parents=True, exist_ok=True)

    def _artifact(self, ref: str, what: str):
        art_id = ref.split(":", 1)[1].strip()
        art = get_artifact(self.s, self.tenant, art_id)
        if art is None:
            raise InvalidInput(f"{what}: artifact {art_id!r} not found (upload it with POST /artifacts)")
        return art

    def file(self, ref: str | None, what: str) -> str | None:
        """weights / mask / generator reference -> local path string."""
        if ref is None:
            return None
        if ref.startswith("artifact:"):
            art = self._artifact(ref, what)
            dest = self.dir / f"{what}-{art.id}{_suffix(art.filename)}"
            return str(copy_to(self.store, art.storage_key, dest))
        if not within_roots(Path(ref), self.settings.data_roots):
            raise InvalidInput(
                f"{what}: path {ref!r} is outside the allowed data roots; upload it as an artifact"
            )
        return ref

    def dataset(self, ref: str) -> str:
        if ref.startswith("artifact:"):
            art = self._artifact(ref, "dataset")
            suffix = _suffix(art.filename)
            if suffix == ".npz":
                dest = self.dir / f"dataset-{art.id}.npz"
                return "npz:" + str(copy_to(self.store, art.storage_key, dest))
            if suffix in ARCHIVE_SUFFIXES:
                dest = self.dir / f"dataset-{art.id}"
                done = dest / ".complete"
                if not done.exists():  # a retried job reuses a finished extraction
                    shutil.rmtree(dest, ignore_errors=True)
                    safe_extract(
                        self.store.local_path(art.storage_key),
                        dest / "data",
                        max_bytes=self.settings.max_extract_bytes,
                        max_files=self.settings.max_extract_files,
                    )
                    done.touch()
                return "imagefolder:" + str(image_root(dest / "data"))
            raise DatasetError(
                f"dataset artifact {art.filename!r}: expected .npz or an archive "
                f"({', '.join(ARCHIVE_SUFFIXES)})"
            )
        kind, _, path = ref.partition(":")
        if kind == "imagefolder" and is_s3_url(path):
            check_dataset_url(path, self.settings)
            return ref  # read object by object during the job (store.objects)
        local = kind in ("npz", "imagefolder") or (kind == "fashion-mnist" and path)
        if local and not within_roots(Path(path), self.settings.data_roots):
            raise DatasetError(f"dataset path {path!r} is outside the allowed data roots")
        return ref

    def resolve(self, spec: JobSpec) -> JobSpec:
        """A copy of `spec` with every reference replaced by a local one."""
        model = spec.model.model_copy(
            update={
                "weights": self.file(spec.model.weights, "weights"),
                "program": self.file(spec.model.program, "program"),
            }
        )
        transform = spec.transform.model_copy(
            update={
                "encoder": self.file(spec.transform.encoder, "encoder"),
                "decoder": self.file(spec.transform.decoder, "decoder"),
            }
        )
        return spec.model_copy(
            update={
                "model": model,
                "transform": transform,
                "dataset": self.dataset(spec.dataset),
                "mask": self.file(spec.mask, "mask"),
            }
        )


def allowed_roots(settings: Settings, job_dir: Path) -> list[Path]:
    """Folders the pipeline may read datasets from for this job."""
    return [*settings.data_roots, job_dir]


__all__ = ["InputResolver", "allowed_roots", "image_root", "safe_extract"]
