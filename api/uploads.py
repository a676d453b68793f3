"""Streaming multipart/form-data upload: the request body is parsed as it arrives (python-multipart
push parser) and the one file part is written to a temporary file in chunks while its sha256 and
size are computed. Past `max_bytes` the upload stops at once with 413 and the temporary file is
removed; nothing of a failed upload is kept. Small form fields (e.g. `kind`) are capped at 1 KiB."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from api.errors import ApiProblem

FIELD_LIMIT = 1024
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries allowed on top of the file itself


@dataclass
class Upload:
    path: Path
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _too_large(max_bytes: int) -> ApiProblem:
    return ApiProblem(
        413,
        "upload-too-large",
        f"The upload exceeds the limit of {max_bytes} bytes.",
        title="Content Too Large",
    )


def _bad(detail: str) -> ApiProblem:
    return ApiProblem(400, "malformed-upload", detail, title="Malformed upload")


class _Collector:
    """Callbacks for MultipartParser: one file part to disk, other parts as small text fields."""

    def __init__(self, tmp_dir: Path, max_bytes: int, file_field: str) -> None:
        self.tmp_dir, self.max_bytes, self.file_field = tmp_dir, max_bytes, file_field
        self.fields: dict[str, str] = {}
        self.file_path: Path | None = None
        self.filename: str | None = None
        self.size = 0
        self.hasher = hashlib.sha256()
        self._fh = None
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()
        self.ended = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_end(self) -> None:
        self.ended = True

    def on_part_begin(self) -> None:
        self._headers, self._name, self._is_file, self._buf = {}, None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        name = params.get(b"name")
        if name is None:
            raise _bad("A multipart part has no Content-Disposition name.")
        self._name = name.decode("utf-8", "replace")
        filename = params.get(b"filename")
        if self._name == self.file_field:
            if self._fh is not None:
                raise _bad(f"Send exactly one '{self.file_field}' part.")
            self._is_file = True
            raw = filename.decode("utf-8", "replace") if filename is not None else "upload.bin"
            raw = "".join(c for c in raw if c.isprintable())  # no NUL / control characters
            self.filename = Path(raw.replace("\\", "/")).name[:255] or "upload.bin"
            fd, path = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
            self.file_path = Path(path)
            self._fh = os.fdopen(fd, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise _too_large(self.max_bytes)
            self.hasher.update(chunk)
            self._fh.write(chunk)
        else:
            self._buf += chunk
            if len(self._buf) > FIELD_LIMIT:
                raise _bad(f"Form field {self._name!r} is longer than {FIELD_LIMIT} bytes.")

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def cleanup(self) -> None:
        self.close()
        if self.file_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file_path)


async def receive_upload(request: Request, tmp_dir: Path, max_bytes: int, file_field: str = "file") -> Upload:
    """Stream the multipart body of `request` to a temp file in `tmp_dir`; see the module doc."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiProblem(
            415,
            "unsupported-media-type",
            "Send the upload as multipart/form-data with a 'file' part and a 'kind' field.",
            title="Unsupported Media Type",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(tmp_dir, max_bytes, file_field)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
        collector.close()
        if not collector.ended:
            raise _bad("The multipart body is incomplete (no closing boundary).")
    except MultipartParseError as exc:
        collector.cleanup()
        raise _bad(f"The multipart body could not be parsed: {exc}") from None
    except ClientDisconnect:
        collector.cleanup()
        raise _bad("The client disconnected during the upload.") from None
    except BaseException:
        collector.cleanup()
        raise
    if collector.file_path is None:
        raise _bad(f"The form has no '{file_field}' file part.")
    return Upload(
        collector.file_path,
        collector.filename or "upload.bin",
        collector.hasher.hexdigest(),
        collector.size,
        collector.fields,
    )
