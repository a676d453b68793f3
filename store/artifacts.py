"""Artifact blobs (uploaded weights / datasets / generators, produced models / masks / evidence).

Blobs live in an ArtifactStore under an opaque storage key (never derived from user input); the
`artifacts` table holds the metadata (tenant, kind, filename, sha256, size). Two stores:
local filesystem (default) and S3-compatible object storage (boto3, e.g. MinIO).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from store.models import ARTIFACT_KINDS, Artifact, is_id
from store.settings import Settings, get_settings

CHUNK = 1024 * 1024


class ArtifactTooLarge(InvalidInput):
    """An upload above settings.max_upload_bytes (the API answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"file is larger than the limit of {limit} bytes")
        self.limit = limit


class ArtifactMissing(InvalidInput):
    """A storage key or artifact id that does not exist."""


def _new_key() -> str:
    u = uuid.uuid4().hex
    return f"{u[:2]}/{u}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if len(parts) != 2 or not all(p and p.isalnum() for p in parts):
        raise ArtifactMissing(f"invalid storage key {key!r}")
    return key


@contextmanager
def _spooled(src: Path | BinaryIO, directory: Path, max_bytes: int | None) -> Iterator[tuple[Path, str, int]]:
    """Copy `src` into a temporary file in `directory` while hashing it; yields (tmp, sha256, size)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".upload-")
    tmp = Path(tmp_name)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            fin = open(src, "rb") if isinstance(src, (str, Path)) else src  # noqa: SIM115
            try:
                while chunk := fin.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ArtifactTooLarge(max_bytes)
                    h.update(chunk)
                    out.write(chunk)
            finally:
                if fin is not src:
                    fin.close()
        yield tmp, h.hexdigest(), size
    finally:
        tmp.unlink(missing_ok=True)


class ArtifactStore:
    """Local filesystem store: blob of key "ab/abcdef..." at <root>/ab/abcdef...."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put_file(self, src: Path | BinaryIO, max_bytes: int | None = None) -> tuple[str, str, int]:
        """Store a file or a readable binary stream; returns (storage_key, sha256, size).
        Raises ArtifactTooLarge (nothing stored) past `max_bytes`."""
        key = _new_key()
        dest = self.root / key
        with _spooled(src, self.root / ".tmp", max_bytes) as (tmp, digest, size):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        return key, digest, size

    def local_path(self, key: str) -> Path:
        path = self.root / _check_key(key)
        if not path.is_file():
            raise ArtifactMissing(f"artifact blob {key!r} is missing")
        return path

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")  # noqa: SIM115

    def delete(self, key: str) -> None:
        (self.root / _check_key(key)).unlink(missing_ok=True)


class S3ArtifactStore(ArtifactStore):
    """S3-compatible store (AWS, MinIO): object <prefix><key> in `bucket`; local_path() downloads
    into a cache folder under settings.artifact_root. Needs the `s3` extra (boto3); credentials
    from the usual AWS_* environment variables."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, cache_root: Path) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        self.root = Path(cache_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put_file(self, src: Path | BinaryIO, max_bytes: int | None = None) -> tuple[str, str, int]:
        key = _new_key()
        with _spooled(src, self.root / ".tmp", max_bytes) as (tmp, digest, size):
            self.client.upload_file(str(tmp), self.bucket, self.prefix + key)
        return key, digest, size

    def local_path(self, key: str) -> Path:
        path = self.root / "cache" / _check_key(key)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.part")
            try:
                self.client.download_file(self.bucket, self.prefix + key, str(tmp))
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise ArtifactMissing(f"artifact blob {key!r} is missing: {exc}") from exc
            os.replace(tmp, path)
        return path

    def open(self, key: str) -> BinaryIO:
        return open(self.local_path(key), "rb")  # noqa: SIM115

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + _check_key(key))
        (self.root / "cache" / key).unlink(missing_ok=True)

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists (deployment bootstrap); True when it was created."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        region = self.client.meta.region_name
        if region and region != "us-east-1":  # AWS wants the region named outside us-east-1
            self.client.create_bucket(
                Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": region}
            )
        else:
            self.client.create_bucket(Bucket=self.bucket)
        return True


def make_artifact_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_backend == "s3":
        if not settings.s3_bucket:
            raise ValueError("CARCERT_S3_BUCKET is required with CARCERT_ARTIFACT_BACKEND=s3")
        return S3ArtifactStore(
            settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.artifact_root
        )
    return ArtifactStore(settings.artifact_root)


def get_artifact_store() -> ArtifactStore:
    """The store configured by the current settings."""
    return make_artifact_store(get_settings())


# --- metadata rows -------------------------------------------------------------------------------


def safe_filename(name: str | None) -> str:
    """The base name of a client-supplied file name, printable and at most 255 characters."""
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    base = "".join(c for c in base if c.isprintable() and c not in "\"'")
    return (base or "upload")[:255]


def create_artifact(
    s: Session, tenant: str, kind: str, filename: str, sha256: str, size: int, storage_key: str
) -> Artifact:
    if kind not in ARTIFACT_KINDS:
        raise InvalidInput(f"artifact kind must be one of {', '.join(ARTIFACT_KINDS)}, not {kind!r}")
    row = Artifact(
        tenant=tenant,
        kind=kind,
        filename=safe_filename(filename),
        sha256=sha256,
        size=size,
        storage_key=storage_key,
    )
    s.add(row)
    s.flush()
    return row


def store_artifact(
    s: Session,
    tenant: str,
    kind: str,
    filename: str,
    src: Path | BinaryIO,
    *,
    store: ArtifactStore | None = None,
    max_bytes: int | None = None,
) -> Artifact:
    """put_file + create_artifact in one step (the blob is deleted again if the row fails)."""
    if kind not in ARTIFACT_KINDS:
        raise InvalidInput(f"artifact kind must be one of {', '.join(ARTIFACT_KINDS)}, not {kind!r}")
    store = store or get_artifact_store()
    key, digest, size = store.put_file(src, max_bytes=max_bytes)
    try:
        return create_artifact(s, tenant, kind, filename, digest, size, key)
    except BaseException:
        store.delete(key)
        raise


def get_artifact(s: Session, tenant: str, artifact_id: str) -> Artifact | None:
    """The artifact if it belongs to `tenant`, else None (another tenant's id looks absent)."""
    row = s.get(Artifact, artifact_id) if is_id(artifact_id) else None
    return row if row is not None and row.tenant == tenant else None


def artifact_kind(s: Session, tenant: str, artifact_id: str) -> str | None:
    """The kind of the tenant's artifact `artifact_id`, or None (absent or another tenant's)."""
    return s.scalar(select(Artifact.kind).where(Artifact.id == artifact_id, Artifact.tenant == tenant))


def copy_to(store: ArtifactStore, key: str, dest: Path) -> Path:
    """Materialise a blob at `dest` (hard link when possible, else a copy)."""
    src = store.local_path(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return dest
