"""The ground floor of core: what a pipeline stage needs from its caller (StageContext), the
local-folder implementation (LocalContext), the per-variant view of it with overall progress
(Slots, ScopedContext), and atomic JSON writing (the path-confinement guard is core.paths.within_roots).

Imports nothing from the rest of core except core.errors, so every stage module (car, training,
baselines, certify) and the orchestrator (pipeline) can import it without a circle."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from core.errors import Cancelled


class StageContext(Protocol):
    """What the pipeline needs from its caller."""

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """Report the current stage and overall progress in [0, 1]."""

    def should_cancel(self) -> bool:
        """True once the job was cancelled; the pipeline then raises core.errors.Cancelled."""

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        """Persist `state` (tensors, numbers, strings, lists/dicts of those) under `key`."""

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        """The last state saved under `key`, or None."""


class LocalContext:
    """StageContext on a local folder: checkpoints are `<dir>/checkpoints/<key>.pt`, written
    atomically and read back with torch.load(weights_only=True)."""

    def __init__(
        self,
        directory: Path,
        on_progress: Callable[[str, float, str], None] | None = None,
        cancel_flag: Callable[[], bool] | None = None,
    ) -> None:
        self.dir = Path(directory) / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._on_progress = on_progress
        self._cancel_flag = cancel_flag

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        if self._on_progress is not None:
            self._on_progress(stage, min(max(fraction, 0.0), 1.0), message)

    def should_cancel(self) -> bool:
        return bool(self._cancel_flag and self._cancel_flag())

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.dir / f"{safe}.pt"

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


class Slots:
    """Overall progress: the job is a sequence of slots (a stage of a variant) with cost weights;
    overall = (done weight + weight * fraction) / total weight, never decreasing."""

    def __init__(self) -> None:
        self.order: list[tuple[str, str, float]] = []  # (variant, stage, weight)
        self.best = 0.0

    def add(self, owner: str, stage: str, weight: float) -> None:
        self.order.append((owner, stage, max(float(weight), 1e-6)))

    def overall(self, owner: str, stage: str, fraction: float) -> float | None:
        total = sum(w for _, _, w in self.order)
        done = 0.0
        for o, s, w in self.order:
            if o == owner and s == stage:
                self.best = max(self.best, (done + w * min(max(fraction, 0.0), 1.0)) / total)
                return self.best
            done += w
        return None


class ForwardingContext:
    """A StageContext over another one: cancel checks and checkpoints go to `ctx` as they are;
    subclasses map progress (the default forwards it unchanged)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.ctx.progress(stage, fraction, message)

    def should_cancel(self) -> bool:
        return self.ctx.should_cancel()

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        self.ctx.save_checkpoint(key, state)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        return self.ctx.load_checkpoint(key)


class ScopedContext:
    """A StageContext view for one variant: checkpoint keys prefixed "<owner>/", progress of its
    stages mapped onto the job's overall fraction (unknown stage names keep the current one)."""

    def __init__(self, ctx: StageContext, owner: str, slots: Slots, prefix: str | None = None) -> None:
        self.ctx, self.owner, self.slots = ctx, owner, slots
        self.prefix = owner if prefix is None else prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        overall = self.slots.overall(self.owner, stage, fraction)
        if overall is None:
            overall = self.slots.best
        text = f"{self.owner}: {message}" if message else self.owner
        self.ctx.progress(stage, overall, text)

    def should_cancel(self) -> bool:
        return self.ctx.should_cancel()

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        self.ctx.save_checkpoint(self._key(key), state)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        return self.ctx.load_checkpoint(self._key(key))


def check_cancel(ctx: StageContext, where: str) -> None:
    """Raise core.errors.Cancelled when the context says the job was cancelled."""
    if ctx.should_cancel():
        raise Cancelled(f"job cancelled before {where}")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, so equal results give equal bytes)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
