"""What `carcert submit --wait` shows beside the bar: the variant(s) the job is on and an ETA.

The ETA is measured on the client (no clock shared with the server): from the first poll that saw
the job running, progress p0 at time t0, to now (p, t): remaining = (t - t0) (1 - p) / (p - p0).
"""

from __future__ import annotations

import time
from typing import Any

from core.methods import prunes


def variant_label(job: dict[str, Any]) -> str:
    """The variant(s) a job is on: a sweep spread over workers names its running units (and how
    many are done); a one-variant job its only variant (method-ratio); else ""."""
    units = job.get("units") or []
    if units:
        running = [u["name"] for u in units if u.get("status") == "running"]
        done = sum(u.get("status") == "succeeded" for u in units)
        return f"{','.join(running) or '-'} ({done}/{len(units)} done)"
    spec = job.get("spec") or {}
    if spec.get("kind") == "certify":
        return "certify"
    methods, ratios = spec.get("sweep_methods"), spec.get("sweep_prune_ratios")
    pruning = spec.get("pruning") or {}
    if (methods and len(methods) > 1) or (ratios and len(ratios) > 1) or not pruning:
        return ""
    method = (methods or [pruning.get("method")])[0]
    ratio = float((ratios or [pruning.get("prune_ratio", 0.0)])[0]) if prunes(str(method)) else 0.0
    return f"{method}-{ratio:.2f}"


def eta_seconds(elapsed: float, p0: float, p: float) -> float | None:
    """Seconds left at progress p, `elapsed` seconds after progress p0 (None: no rate yet)."""
    if p >= 1.0:
        return 0.0
    if elapsed <= 0 or p <= p0:
        return None
    return elapsed * (1.0 - p) / (p - p0)


def format_eta(seconds: float | None) -> str:
    """'ETA 1h02m', 'ETA 3m07s', 'ETA 12s', or 'ETA ?' when unknown."""
    if seconds is None:
        return "ETA ?"
    s = int(round(seconds))
    if s >= 3600:
        return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s}s"


class EtaClock:
    """Tracks (t0, p0) from the first running poll; `text(job)` is the variant + ETA suffix."""

    def __init__(self, now: Any = time.monotonic) -> None:
        self._now = now
        self._start: tuple[float, float] | None = None

    def text(self, job: dict[str, Any]) -> str:
        p = float(job.get("progress") or 0.0)
        eta = "ETA ?"
        if job.get("status") == "running":
            if self._start is None:
                self._start = (self._now(), p)
            t0, p0 = self._start
            eta = format_eta(eta_seconds(self._now() - t0, p0, p))
        label = variant_label(job)
        return f"{label} {eta}".strip() if job.get("status") == "running" else label
