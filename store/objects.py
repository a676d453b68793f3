"""Datasets read straight from S3: the core.objectstore.ObjectStore over boto3.

`S3Objects(endpoint_url, allowed=None)` lists and fetches objects with the usual AWS_* credentials
(the artifact store's endpoint, CARCERT_S3_ENDPOINT_URL); with `allowed` (s3:// folders) it refuses
any other bucket or prefix with a DatasetError. The boto3 client is made per process (DataLoader
worker processes fork: a client is never shared across a fork).

In the service, imagefolders are read from the artifact bucket under
`s3://CARCERT_S3_BUCKET/CARCERT_S3_PREFIX + CARCERT_S3_DATASETS_PREFIX` ("datasets/" by default),
a folder operators fill (e.g. `aws s3 sync ./flowers s3://carcert/carcert/datasets/flowers/`) and every
tenant may read, like the local data roots; uploaded blobs (keys `<prefix>xx/<uuid>`) lie outside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from core.errors import DatasetError
from core.objectstore import S3Location, is_s3_url, parse_s3_url
from store.settings import Settings


class S3Objects:
    """core.objectstore.ObjectStore over boto3 (module docstring)."""

    def __init__(self, endpoint_url: str | None = None, allowed: Sequence[str] | None = None) -> None:
        self.endpoint_url = endpoint_url
        self.allowed = None if allowed is None else [parse_s3_url(a) for a in allowed]
        self._client: Any = None
        self._pid = -1

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            import boto3

            self._client, self._pid = boto3.client("s3", endpoint_url=self.endpoint_url), os.getpid()
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn: no client
        return {**self.__dict__, "_client": None, "_pid": -1}

    def check(self, bucket: str, key: str) -> None:
        """DatasetError unless s3://bucket/key lies inside one of the allowed folders."""
        if self.allowed is None:
            return
        if not any(bucket == a.bucket and key.startswith(a.prefix) for a in self.allowed):
            roots = ", ".join(a.url for a in self.allowed) or "(none)"
            raise DatasetError(f"s3://{bucket}/{key} is outside the allowed dataset folders ({roots})")

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        self.check(bucket, prefix)
        out: list[tuple[str, int]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        except Exception as exc:  # botocore ClientError / EndpointConnectionError: the user's reference
            raise DatasetError(f"cannot list s3://{bucket}/{prefix}: {exc}") from None
        return out

    def get(self, bucket: str, key: str, length: int | None = None) -> bytes:
        self.check(bucket, key)
        extra = {"Range": f"bytes=0-{length - 1}"} if length is not None else {}
        try:
            return self.client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable object is a dataset error
            raise DatasetError(f"cannot read s3://{bucket}/{key}: {exc}") from None


def objects_for(ref: str | None) -> S3Objects | None:
    """The command line's ObjectStore for a dataset reference: unconfined S3Objects at
    CARCERT_S3_ENDPOINT_URL for an imagefolder:s3:// reference (the user's own credentials), else None."""
    if not ref or not is_s3_url(ref.partition(":")[2]):
        return None
    from store.settings import get_settings

    return S3Objects(get_settings().s3_endpoint_url)


def datasets_folder(settings: Settings) -> S3Location | None:
    """The artifact bucket's dataset folder (module docstring), None without an S3 artifact store."""
    if settings.artifact_backend != "s3" or not settings.s3_bucket:
        return None
    return parse_s3_url(f"s3://{settings.s3_bucket}/{settings.s3_prefix}{settings.s3_datasets_prefix}")


def service_objects(settings: Settings) -> S3Objects | None:
    """The ObjectStore jobs read imagefolder:s3:// datasets through: confined to datasets_folder."""
    folder = datasets_folder(settings)
    return None if folder is None else S3Objects(settings.s3_endpoint_url, allowed=[folder.url])


def check_dataset_url(url: str, settings: Settings) -> S3Location:
    """The parsed s3:// folder if the service may read it, else DatasetError saying where datasets go."""
    if not is_s3_url(url):
        raise DatasetError(f"{url!r} is not an s3:// URL")
    loc = parse_s3_url(url)
    folder = datasets_folder(settings)
    if folder is None:
        raise DatasetError("s3:// datasets need the S3 artifact store (CARCERT_ARTIFACT_BACKEND=s3)")
    if not loc.within(folder):
        raise DatasetError(f"{url} is outside the dataset folder {folder.url} of the artifact bucket")
    return loc


__all__ = ["S3Objects", "check_dataset_url", "datasets_folder", "objects_for", "service_objects"]
