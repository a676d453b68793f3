"""A real S3 server for tests: moto's standalone server as a subprocess on loopback, spoken to over
HTTP by boto3 (no mocks in the test process). `moto_s3(log)` yields (endpoint URL, boto3 client)
with BUCKET created; the server's request log (one line per HTTP request) goes to `log`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from carcert.cli_service import free_port
from tests.integration.service_helpers import wait_for

BUCKET = "carcert-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@contextmanager
def moto_s3(log: Path) -> Iterator[tuple[str, Any]]:
    """(url, client) of a fresh moto S3 server holding the empty bucket BUCKET; stopped on exit."""
    pytest.importorskip("moto.server", reason="moto[s3] + flask (dev extra) run the S3 test server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 60, what="the S3 server")
        client = boto3.client("s3", endpoint_url=url, **boto_credentials())
        client.create_bucket(Bucket=BUCKET)
        yield url, client
    finally:
        proc.terminate()
        proc.wait(10)
