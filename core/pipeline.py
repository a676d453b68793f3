"""Pipeline stages: pretrain -> mask search -> binarize -> finetune -> evaluate -> certify.

Contract (used by the CLI and the Celery worker alike):

    run_job(spec: JobSpec, out_dir: Path, ctx: StageContext, device: str | None = None) -> dict

writes, for each variant of `spec.variants()` (a variant = one method x prune ratio), a folder
`out_dir/<method>-<ratio>/` (e.g. `car-0.50`, `vanilla-0.00`) holding
    model.safetensors   pruned weights (zeros where the mask is 0), loadable into a plain model
    mask.safetensors    bool masks per prunable layer (absent for unpruned methods)
    metrics.json        {"method","prune_ratio","accuracy","sparsity","layers":[...],"seconds",...}
    certificate.json    the DESIGN.md certificate
    evidence.npz        every Z value, for `carcert verify`
and returns the summary {"variants": [{"name", "method", "prune_ratio", "accuracy", "pca", ...}]}.
kind=certify jobs write a single folder `certify/`.

Progress, cancel and checkpoints go through `ctx`; a rerun with the same out_dir and ctx resumes
from the last checkpoint and gives the same result as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch


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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, so equal results give equal bytes)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
