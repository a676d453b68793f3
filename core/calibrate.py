"""The forward batch size of a certification run, chosen from a short calibration.

Certification is n * l forwards per sample; on a CPU the throughput of a forward depends on its
batch size (cache effects: on the 2-core Zen 3 of bench/RESULTS.md a resnet18 at 32x32 ran faster
at 250 than at 1000). `calibrated_batch(run, requested, cap, key)` times `run(b)` (one forward of b
inputs of the real model, shape and device) for the candidate batches CANDIDATE_FACTORS x requested
that fit under `cap` (core.datasets.forward_batch, the memory bound), one warm-up and one timed call
each, and returns the one of highest measured inputs/s (`pick_batch`: ties go to the smaller batch).

The choice is cached per `key` (the model's architecture signature, input shape, device, precision,
form, torch version and thread count) in memory and in a JSON file (CALIBRATION_CACHE_ENV, default
~/.cache/carcert/forward-batch.json; unwritable: memory only), so a machine calibrates a given model
and shape once and later runs, in this process or the next, take the same batch: the certificate
stays a function of the inputs on a given machine. The batch does not change what is computed
(rows are independent in eval mode; only kernel rounding, ~1e-7 on probabilities, can differ).

Policy (`should_calibrate`), env CALIBRATE_ENV = auto (default) | on | off: auto calibrates when the
run's work (forwards x FLOPs per forward) reaches CALIBRATE_MIN_FLOPS, where the few hundred
calibration forwards are a small share of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CALIBRATE_ENV = "CARCERT_BATCH_CALIBRATION"
CALIBRATION_CACHE_ENV = "CARCERT_CALIBRATION_CACHE"
CANDIDATE_FACTORS = (0.25, 0.5, 1.0, 2.0)
MIN_BATCH = 16
CALIBRATE_MIN_FLOPS = 1e13  # ~9,000 resnet18 forwards at 32x32 (~50 s of eager work on 2 CPU cores)
_MEMORY: dict[str, int] = {}


def calibration_setting() -> str:
    """CARCERT_BATCH_CALIBRATION: "auto", "on" or "off" (unset or empty: auto; else ValueError)."""
    value = os.environ.get(CALIBRATE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{CALIBRATE_ENV} must be auto, on or off; got {value!r}")
    return value


def should_calibrate(work_flops: float, calibrate: bool | None = None) -> bool:
    """The module docstring's policy for a run of `work_flops` (forwards x FLOPs per forward)."""
    setting = calibration_setting()
    if setting != "auto":
        return setting == "on"
    if calibrate is not None:
        return calibrate
    return work_flops >= CALIBRATE_MIN_FLOPS


def candidate_batches(requested: int, cap: int) -> list[int]:
    """Distinct batches round(f * requested) for f in CANDIDATE_FACTORS, within [min(MIN_BATCH,
    requested), cap], ascending; always holds min(requested, cap)."""
    low = min(MIN_BATCH, requested)
    out = {min(cap, max(low, round(f * requested))) for f in CANDIDATE_FACTORS}
    return sorted(out | {min(requested, cap)})


def pick_batch(seconds: dict[int, float]) -> int:
    """The batch of highest throughput b / seconds[b] (ties: the smaller batch)."""
    if not seconds:
        raise ValueError("no timings to pick from")
    return max(sorted(seconds), key=lambda b: b / max(seconds[b], 1e-12))


def time_batches(
    run: Callable[[int], object], batches: Sequence[int], clock: Callable[[], float] = time.perf_counter
) -> dict[int, float]:
    """{b: seconds of run(b)}, each after one untimed warm-up run(b)."""
    out = {}
    for b in batches:
        run(b)
        t0 = clock()
        run(b)
        out[b] = clock() - t0
    return out


def model_signature(model: nn.Module) -> str:
    """sha256 of the architecture (module structure, parameter and buffer names, shapes, dtypes):
    equal for the same network whatever its weights or mask."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    return h.hexdigest()


def cache_key(model: nn.Module, item_shape: Sequence[int], device: torch.device, precision: str,
              form: str, requested: int, cap: int) -> str:
    """The calibration cache key (module docstring)."""
    return "|".join(map(str, (model_signature(model), tuple(item_shape), device, precision, form, requested,
                               cap, torch.__version__, torch.get_num_threads())))


def _cache_file() -> Path:
    env = os.environ.get(CALIBRATION_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "carcert" / "forward-batch.json"


def _read_file(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def _write_file(path: Path, key: str, batch: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_file(path), key: batch}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True, indent=0))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the choice is kept in memory only
        log.info("batch calibration cache %s not written: %s", path, exc)


def calibrated_batch(
    run: Callable[[int], object],
    requested: int,
    cap: int,
    key: str,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, str]:
    """(batch, "cached" | "measured") for `key`: the cached choice, else pick_batch over
    time_batches(run, candidate_batches(requested, cap)), then cached (module docstring)."""
    if key in _MEMORY:
        return _MEMORY[key], "cached"
    path = _cache_file()
    stored = _read_file(path).get(key)
    if stored is not None and 1 <= stored <= cap:
        _MEMORY[key] = stored
        return stored, "cached"
    seconds = time_batches(run, candidate_batches(requested, cap), clock)
    batch = pick_batch(seconds)
    rates = {b: round(b / max(s, 1e-12), 1) for b, s in seconds.items()}
    log.info("forward batch calibration (inputs/s): %s -> %d", rates, batch)
    _MEMORY[key] = batch
    _write_file(path, key, batch)
    return batch, "measured"


__all__ = [
    "CALIBRATE_ENV",
    "CALIBRATE_MIN_FLOPS",
    "CALIBRATION_CACHE_ENV",
    "CANDIDATE_FACTORS",
    "cache_key",
    "calibrated_batch",
    "calibration_setting",
    "candidate_batches",
    "model_signature",
    "pick_batch",
    "should_calibrate",
    "time_batches",
]
