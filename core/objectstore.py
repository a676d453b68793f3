"""The object-store interface core reads datasets through (an S3 imagefolder), and its URLs.

core never talks to S3 itself: whoever loads an ``imagefolder:s3://BUCKET/PREFIX`` dataset injects
an ObjectStore (store.objects.S3Objects over boto3, or any object with these two methods):

    list(bucket, prefix) -> [(key, size in bytes)]  every object whose key starts with prefix
    get(bucket, key, length=None) -> bytes          the object, or only its first `length` bytes

A store may refuse a bucket / prefix it does not serve by raising core.errors.DatasetError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.errors import DatasetError

S3_SCHEME = "s3://"


class ObjectStore(Protocol):
    """Read access to the objects of an S3-compatible store (module docstring)."""

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int]]: ...

    def get(self, bucket: str, key: str, length: int | None = None) -> bytes: ...


@dataclass(frozen=True)
class S3Location:
    """s3://bucket/prefix with the prefix ending in "/" (a folder), or "" for the whole bucket."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"

    def within(self, root: S3Location) -> bool:
        """Whether this folder lies inside `root` (same bucket, key prefix under root's)."""
        return self.bucket == root.bucket and self.prefix.startswith(root.prefix)


def is_s3_url(value: str) -> bool:
    return value.startswith(S3_SCHEME)


def parse_s3_url(url: str) -> S3Location:
    """s3://BUCKET[/PREFIX] -> S3Location (prefix normalised to end with "/"); DatasetError when the
    bucket is missing or the prefix has empty, "." or ".." segments."""
    if not is_s3_url(url):
        raise DatasetError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket or any(c in bucket for c in "\\ ") or len(bucket) > 255:
        raise DatasetError(f"{url!r}: missing or invalid bucket name")
    parts = [p for p in prefix.split("/")]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts):
        raise DatasetError(f"{url!r}: empty, '.' or '..' segments are not allowed in the prefix")
    return S3Location(bucket, "".join(p + "/" for p in parts))


__all__ = ["S3_SCHEME", "ObjectStore", "S3Location", "is_s3_url", "parse_s3_url"]
