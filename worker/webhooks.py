"""Completion webhooks: on every final status (succeeded, failed, cancelled) of a job whose spec has
`webhook {url}`, a worker POSTs one JSON event to the URL.

- Event: {"event": "job.<status>", "id", "status", "name", "labels", "kind", "created_at",
  "finished_at", "error", "summary", "links"} (links absolute when CARCERT_PUBLIC_URL is set).
- Signature (GitHub's convention): `X-Carcert-Signature: sha256=<hex HMAC-SHA256 of the raw body
  with CARCERT_WEBHOOK_SECRET>`; no secret, no signature header. `X-Carcert-Event` and
  `X-Carcert-Delivery` (the job id) name the event.
- Retries: up to settings.webhook_max_attempts attempts in all, waiting webhook_backoff_s * 2^(k-1)
  before attempt k+1; a 2xx answer is delivered, anything else (or no answer) is retried. Redirects
  are not followed. Each attempt is recorded on the job (store.webhooks).
- SSRF (worker.webhook_guard): the host is resolved and every address it resolves to must be
  public unless the host is listed in CARCERT_WEBHOOK_ALLOWED_HOSTS. The API checks at submit
  time; every attempt checks again (parsing the URL as httpx sends it) and connects to the address it
  checked (the Host header and TLS SNI keep the name), so a DNS answer that changes in between
  cannot redirect the request. No proxy from the environment is used (it would undo the pinning).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import httpx

from store.db import session_scope
from store.settings import Settings, get_settings
from store.webhooks import claim_delivery, due_deliveries, record_delivery
from worker.webhook_guard import WebhookRefused, resolve_checked

log = logging.getLogger("carcert.worker")

SIGNATURE_HEADER = "X-Carcert-Signature"


def sign(body: bytes, secret: str) -> str:
    """'sha256=' + hex HMAC-SHA256(secret, body): the X-Carcert-Signature value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def resolve_allowed(url: str, settings: Settings) -> tuple[httpx.URL, str]:
    """(the URL with its host replaced by a checked address, the original host) for `url`, parsed
    the way the request will be sent (httpx); WebhookRefused when the guard refuses the host."""
    parsed = httpx.URL(url)
    host = parsed.host
    if parsed.scheme not in ("http", "https") or not host:
        raise WebhookRefused(f"webhook URL must be http(s) with a host: {url[:200]!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolve_checked(host, port, settings)
    return parsed.copy_with(host=addresses[0]), host


def job_links(job_id: str, status: str, settings: Settings) -> dict[str, str]:
    base = (settings.public_url or "").rstrip("/") + f"/jobs/{job_id}"
    links = {"self": base, "logs": f"{base}/logs", "report": f"{base}/report"}
    if status == "succeeded":
        links.update(
            certificate=f"{base}/certificate",
            model=f"{base}/model",
            mask=f"{base}/mask",
            evidence=f"{base}/evidence",
        )
    return links


def event_of(job: Any, settings: Settings) -> dict[str, Any]:
    """The event document of a job that has reached its final status."""
    spec = job.spec or {}
    return {
        "event": f"job.{job.status}",
        "id": job.id,
        "status": job.status,
        "name": spec.get("name"),
        "labels": spec.get("labels") or {},
        "kind": job.kind,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": job.error,
        "summary": job.summary,
        "links": job_links(job.id, job.status, settings),
    }


def post_once(
    url: str, body: bytes, headers: dict[str, str], settings: Settings
) -> tuple[int | None, str | None]:
    """One attempt: (HTTP status or None, error text or None for a 2xx)."""
    try:
        target, host = resolve_allowed(url, settings)
    except WebhookRefused as exc:
        return None, str(exc)
    original = httpx.URL(url)
    host_header = original.netloc.decode("ascii")
    try:
        with httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            response = client.post(
                target,
                content=body,
                headers={**headers, "Host": host_header},
                extensions={"sni_hostname": host},
            )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def _lease_s(settings: Settings) -> float:
    """How long a claimed delivery may take before another worker may take it over."""
    n = settings.webhook_max_attempts
    return n * settings.webhook_timeout_s + settings.webhook_backoff_s * (2**n) + 30.0


def _now() -> str:
    from store.models import utcnow

    return utcnow().isoformat()


def deliver(job_id: str, settings: Settings | None = None) -> str | None:
    """Send the job's event if its delivery is due (claimed here); the final state ("delivered" or
    "failed"), or None when there was nothing to send."""
    settings = settings or get_settings()
    with session_scope() as s:
        job = claim_delivery(s, job_id, _lease_s(settings))
        if job is None:
            return None
        url = str((job.spec.get("webhook") or {}).get("url") or "")
        body = json.dumps(event_of(job, settings), separators=(",", ":"), default=str).encode()
        record = dict(job.webhook_delivery or {})
        event = f"job.{job.status}"
    headers = {"Content-Type": "application/json", "X-Carcert-Event": event, "X-Carcert-Delivery": job_id}
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(body, settings.webhook_secret)
    state = "failed"
    while int(record.get("attempts", 0)) < settings.webhook_max_attempts:
        done = int(record.get("attempts", 0))
        if done:
            time.sleep(settings.webhook_backoff_s * 2 ** (done - 1))
        code, error = post_once(url, body, headers, settings) if url else (None, "no webhook URL")
        record.update(attempts=done + 1, status_code=code, error=error, last_attempt_at=_now())
        ok = error is None
        if ok:
            record["delivered_at"] = record["last_attempt_at"]
        last = ok or done + 1 >= settings.webhook_max_attempts
        state = ("delivered" if ok else "failed") if last else "sending"
        with session_scope() as s:
            record_delivery(s, job_id, state, record)
        if last:
            break
    else:  # resumed with no attempt left
        with session_scope() as s:
            record_delivery(s, job_id, "failed", record)
    note = f"job {job_id}: webhook {state} after {record.get('attempts')} attempt(s)"
    note += f" (last: {record['error']})" if record.get("error") else ""
    log.info("%s", note)
    _job_log(job_id, "INFO" if state == "delivered" else "WARNING", note)
    return state


def _job_log(job_id: str, level: str, message: str) -> None:
    """One line in the job's own log (the delivery runs after the job's log recorder closed)."""
    from store.joblogs import append_lines
    from store.models import utcnow

    with session_scope() as s:
        append_lines(s, job_id, [(utcnow(), level, message)])


def _deliver_quietly(job_id: str) -> None:
    try:
        deliver(job_id)
    except Exception:  # a webhook must never take a worker down; the sweep tries again
        log.exception("job %s: webhook delivery failed", job_id)


def deliver_in_background(job_id: str) -> threading.Thread:
    """deliver(job_id) on a daemon thread (the worker takes its next job meanwhile); a delivery cut
    short by a worker exit is taken over by a later sweep once its lease expires."""
    thread = threading.Thread(
        target=_deliver_quietly, args=(job_id,), name=f"webhook-{job_id[:8]}", daemon=True
    )
    thread.start()
    return thread


def deliver_due(limit: int = 20) -> int:
    """The sweep: start the delivery of every due webhook (a job cancelled while queued, failed by
    the stale-job sweep, or whose delivering worker died); how many were started."""
    with session_scope() as s:
        ids = due_deliveries(s, limit)
    for job_id in ids:
        deliver_in_background(job_id)
    return len(ids)
