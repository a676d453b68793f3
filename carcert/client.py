"""Python client of the carcert REST API (DESIGN.md, "REST").

    with CarcertClient("http://127.0.0.1:8000", api_key="cc_...") as c:
        art = c.upload_artifact("weights.safetensors", "weights")
        job = c.submit(JobSpec(model={"weights": art["ref"]}), idempotency_key="run-1")
        job = c.wait(job["id"], on_progress=lambda j: print(j["stage"], j["progress"]))
        cert = c.certificate(job["id"])

Every non-2xx answer raises CarcertAPIError(status, title, detail, body) parsed from the
application/problem+json document (RFC 9457); a body that is not a problem document still gives
a readable error. Idempotent requests (GET, and POST /jobs with an Idempotency-Key) are retried a
few times on connection errors and 502/503/504 (honouring Retry-After); nothing else is retried.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from core.errors import InvalidInput
from core.spec import JobSpec

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({502, 503, 504})
SHA256_HEADERS = ("x-content-sha256", "x-sha256", "x-checksum-sha256", "content-sha256")


class CarcertAPIError(Exception):
    """An error answer of the API: HTTP status, problem title and detail, and the parsed body
    (the problem document, or {"text": ...} when the body was not JSON)."""

    def __init__(self, status: int, title: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.body = dict(body or {})
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> CarcertAPIError:
        """Parse a problem+json (or any JSON / text) error response."""
        body: dict[str, Any]
        try:
            parsed = response.json()
            body = parsed if isinstance(parsed, dict) else {"body": parsed}
        except ValueError:
            body = {"text": response.text[:2000]}
        title = str(body.get("title") or response.reason_phrase or "Error")
        detail = body.get("detail")
        if detail is None:
            detail = body.get("text", "")
        elif not isinstance(detail, str):  # e.g. a FastAPI default {"detail": [...]} body
            detail = str(detail)
        errors = body.get("errors")
        if isinstance(errors, list) and errors and not detail:
            detail = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in errors)
        status = int(body.get("status") or response.status_code)
        return cls(status, title, str(detail), body)


class ChecksumMismatch(CarcertAPIError):
    """A download whose sha256 differs from the server's header (the file is removed)."""


def coerce_spec(spec: JobSpec | Mapping[str, Any]) -> JobSpec:
    """JobSpec from a JobSpec or a dict; invalid -> InvalidInput listing the bad fields."""
    if isinstance(spec, JobSpec):
        return spec
    try:
        return JobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid job spec: {msgs}") from None


def _header_sha256(headers: httpx.Headers) -> str | None:
    """The sha256 (hex) announced by the server: X-Content-SHA256-style headers, or an RFC 9530
    `Repr-Digest: sha-256=:<base64>:` / RFC 3230 `Digest: sha-256=<base64>` header."""
    for name in SHA256_HEADERS:
        value = headers.get(name)
        if value:
            return value.strip().lower()
    for name in ("repr-digest", "content-digest", "digest"):
        value = headers.get(name)
        if not value:
            continue
        for part in value.split(","):
            algo, _, encoded = part.strip().partition("=")
            if algo.strip().lower() == "sha-256":
                with contextlib.suppress(ValueError):
                    return base64.b64decode(encoded.strip().strip(":")).hex()
    return None


class CarcertClient:
    """Thin synchronous client (httpx). `transport` is for tests (e.g. httpx.MockTransport)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.retries = retries
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CarcertClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, url: str, *, retry: bool, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request; retried with backoff on transport errors / 502-504 when `retry`."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                request = self._http.build_request(method, url, **kw)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(min(0.25 * 2**attempt, 4.0))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                delay = min(0.25 * 2**attempt, 4.0)
                with contextlib.suppress(ValueError, TypeError):
                    delay = min(float(response.headers.get("retry-after", delay)), 10.0)
                response.close()
                time.sleep(delay)
                continue
            if response.is_error:
                if stream:
                    response.read()
                    response.close()
                raise CarcertAPIError.from_response(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, url: str, *, retry: bool | None = None, **kw: Any) -> Any:
        response = self._send(method, url, retry=method == "GET" if retry is None else retry, **kw)
        if response.status_code == 204 or not response.content:
            return {}
        return response.json()

    # -- API ------------------------------------------------------------------------------

    def upload_artifact(self, path: str | Path, kind: str = "weights") -> dict:
        """POST /artifacts (multipart: `file`, `kind`) -> {"id", "sha256", "size", "ref", ...}.
        The returned sha256 is checked against the local file."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"no such file: {path}")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        with path.open("rb") as fh:
            out = self._json(
                "POST",
                "/artifacts",
                files={"file": (path.name, fh, "application/octet-stream")},
                data={"kind": kind},
            )
        if out.get("sha256") and out["sha256"] != digest.hexdigest():
            raise ChecksumMismatch(
                0,
                "Checksum mismatch",
                f"server stored sha256 {out['sha256']}, local {digest.hexdigest()}",
                out,
            )
        return out

    def submit(self, spec: JobSpec | Mapping[str, Any], idempotency_key: str | None = None) -> dict:
        """POST /jobs -> the job (202 new, 200 replay of the same Idempotency-Key). The spec is
        validated locally first (InvalidInput on a bad one)."""
        body = coerce_spec(spec).model_dump(mode="json")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/jobs", json=body, headers=headers, retry=idempotency_key is not None)

    def get_job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def list_jobs(
        self, status: str | None = None, limit: int = 50, labels: Mapping[str, str] | None = None
    ) -> Iterator[dict]:
        """Every job of the tenant (newest first, as the server orders), following next_cursor
        page by page; `limit` is the page size; `labels` {key: value}: only jobs carrying all."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, Any] = {"limit": limit}
            if status:
                params["status"] = status
            if labels:
                params["label"] = [f"{k}:{v}" for k, v in labels.items()]
            if cursor:
                params["cursor"] = cursor
            page = self._json("GET", "/jobs", params=params)
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return
            if cursor in seen:  # a server bug must not loop forever
                raise CarcertAPIError(0, "Pagination loop", f"cursor {cursor!r} returned twice", page)
            seen.add(cursor)

    def delete(self, job_id: str) -> None:
        """DELETE /jobs/{id}: the finished job, its results and produced files (409: still active)."""
        self._json("DELETE", f"/jobs/{job_id}")

    def logs(self, job_id: str) -> dict:
        """GET /jobs/{id}/logs: {"job_id", "lines": [{"seq", "created_at", "level", "message"}]}."""
        return self._json("GET", f"/jobs/{job_id}/logs")

    def report_link(self, job_id: str, ttl: int | None = None) -> dict:
        """POST /jobs/{id}/report/link -> {"url", "expires", "expires_at"}: a signed link that opens
        the job's HTML report without an API key until it expires (ttl seconds, server default 7 days)."""
        params = {"ttl": ttl} if ttl is not None else None
        return self._json("POST", f"/jobs/{job_id}/report/link", params=params)

    def cancel(self, job_id: str) -> dict:
        """POST /jobs/{id}/cancel (idempotent on the server, so retried)."""
        return self._json("POST", f"/jobs/{job_id}/cancel", retry=True)

    def certificate(self, job_id: str, variant: str | None = None) -> dict:
        """GET /jobs/{id}/certificate: the DESIGN.md certificate (sweeps: {"certificates": [{name,
        method, prune_ratio, certificate}]}, or with `variant` that variant's certificate)."""
        doc = self._json("GET", f"/jobs/{job_id}/certificate")
        if variant is None or "certificates" not in doc:
            return doc  # a single-result job: its one certificate
        for entry in doc["certificates"]:
            if entry.get("name") == variant:
                return entry["certificate"]
        names = ", ".join(str(e.get("name")) for e in doc["certificates"])
        raise CarcertAPIError(
            404, "Not Found", f"job {job_id} has no variant {variant!r}; variants: {names}", doc
        )

    def _download(
        self, job_id: str, what: str, dest: str | Path, variant: str | None, fmt: str | None = None
    ) -> Path:
        dest = Path(dest)
        if dest.is_dir():
            suffix = "npz" if what == "evidence" else fmt or "safetensors"
            dest = dest / f"{job_id}-{variant + '-' if variant else ''}{what}.{suffix}"
        tmp = dest.with_name(dest.name + ".part")
        params = {k: v for k, v in (("variant", variant), ("format", fmt)) if v} or None
        response = self._send("GET", f"/jobs/{job_id}/{what}", retry=True, stream=True, params=params)
        digest = hashlib.sha256()
        try:
            expected = _header_sha256(response.headers)
            with tmp.open("wb") as fh:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    fh.write(chunk)
        finally:
            response.close()
        got = digest.hexdigest()
        if expected is None or expected != got:
            tmp.unlink(missing_ok=True)
            detail = (
                "the server sent no sha256 header"
                if expected is None
                else f"downloaded sha256 {got} != announced {expected}"
            )
            raise ChecksumMismatch(response.status_code, "Checksum mismatch", detail, {"sha256": got})
        os.replace(tmp, dest)
        return dest

    def download_model(
        self,
        job_id: str,
        dest: str | Path,
        variant: str | None = None,
        format: str = "safetensors",  # noqa: A002
    ) -> Path:
        """GET /jobs/{id}/model?format= -> dest (a file, or a folder); sha256 checked against the
        header. format: safetensors (weights), pt2 (torch.export program) or onnx; pt2 and onnx
        are exported by the server on the first request (seconds)."""
        return self._download(job_id, "model", dest, variant, None if format == "safetensors" else format)

    def download_mask(self, job_id: str, dest: str | Path, variant: str | None = None) -> Path:
        """GET /jobs/{id}/mask -> dest; sha256 checked against the header."""
        return self._download(job_id, "mask", dest, variant)

    def download_evidence(self, job_id: str, dest: str | Path, variant: str | None = None) -> Path:
        """GET /jobs/{id}/evidence -> dest (npz for `carcert verify --evidence`); the file's sha256 is
        checked against the header. The server's X-Evidence-SHA256 names the certificate's
        evidence_sha256, a hash of the arrays that `carcert verify` recomputes."""
        return self._download(job_id, "evidence", dest, variant)

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict], None] | None = None,
        poll: float = 1.0,
        timeout: float | None = None,
    ) -> dict:
        """Poll GET /jobs/{id} until the job is succeeded, failed or cancelled; return it.
        on_progress(job) is called on the first poll and whenever status, stage or progress
        changed. `timeout` (s) -> TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple | None = None
        while True:
            job = self.get_job(job_id)
            state = (job.get("status"), job.get("stage"), job.get("progress"))
            if on_progress is not None and state != last:
                on_progress(job)
            last = state
            if job.get("status") in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout} s")
            time.sleep(poll)
