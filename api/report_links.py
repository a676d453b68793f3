"""Signed, expiring report links: a URL that opens a job's HTML report in a browser without an
`Authorization` header, e.g. to share it or to open it from `carcert report --open`.

The link is /shared/jobs/{job_id}/report?expires=E&sig=S with E a Unix time (seconds) and S the
hex HMAC-SHA256, under settings.report_link_secret, of "carcert-report-link-v1\\n{tenant}\\n{job_id}\\n{E}".
It proves that a key of the job's tenant asked for it and that E has not passed; changing the job,
the expiry or the signature, or a link of another tenant's job, gives a different HMAC. Without a
configured secret each API process draws a random one (links then die with the process)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

DEFAULT_TTL_S = 7 * 24 * 3600
MAX_TTL_S = 30 * 24 * 3600
PURPOSE = "carcert-report-link-v1"


def link_secret(state: Any, configured: str | None) -> bytes:
    """The configured secret, else one random secret per app (kept in `state`)."""
    if configured:
        return configured.encode()
    secret = getattr(state, "report_link_secret", None)
    if secret is None:
        secret = state.report_link_secret = secrets.token_bytes(32)
    return secret


def sign(secret: bytes, tenant: str, job_id: str, expires: int) -> str:
    """Hex HMAC-SHA256 of the link's message (module docstring)."""
    message = f"{PURPOSE}\n{tenant}\n{job_id}\n{int(expires)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def refusal(
    secret: bytes, tenant: str | None, job_id: str, expires: int, sig: str, now: float | None = None
) -> str | None:
    """Why the link must be refused ("invalid", "expired"), or None when it is good. `tenant` None:
    no such job (refused as invalid, so a link reveals nothing about other ids)."""
    given = sig.strip().lower().encode("utf-8", "replace")
    if tenant is None or not hmac.compare_digest(sign(secret, tenant, job_id, expires).encode(), given):
        return "invalid"
    if expires <= (time.time() if now is None else now):
        return "expired"
    return None
