"""The certification forward pass in the fastest exact form the machine offers.

`prepare_forward(model, item_shape, batch, ...)` returns a Forward: forward(x) -> logits (float32) of
the eval-mode model on x (N, *item_shape), N any size. Forms, fastest last (each is the same
function: float32 results differ from eager NCHW only by kernel rounding, ~1e-7 on probabilities):

    eager          model(x) as given (NCHW): the reference, and the form of non-image inputs
    channels_last  a copy of the model and the inputs in channels_last memory format
    compiled       torch.compile of the channels_last copy for one static batch shape (`batch`):
                   a chunk of at least batch/2 inputs is zero-padded up to it (rows are independent
                   in eval mode), a smaller one runs on the channels_last copy

Precision: "fp32" (default) or "bf16", torch.autocast(device, bfloat16) around the forward: the
model as it would be deployed in bf16 (a different function: its certificate says so).

Form policy, env CARCERT_FORWARD = auto (default) | eager | channels_last | compiled: auto takes
channels_last for image inputs and compiles when the run's work,
forwards x FLOPs of one forward (torch.utils.flop_counter, one extra forward of a zero input, skipped
when 2 x parameters x pixels per forward could not reach it), reaches COMPILE_MIN_FLOPS (3e13: about
27,000 resnet18 forwards at 32x32, some 2.5 min of eager work on 2 CPU cores, where compiling (~40-60 s
there) pays back), or as `compile=True/False` says; the other values force that form (eager: the
reference, e.g. for benchmarks; compiled: whatever the work). The decision is a function
of the model and the work, never of timings, so a run is deterministic on a given machine. If compiling
fails (at torch.compile or the warm-up call that triggers it), the Forward falls back to channels_last
and records why (`describe()["fallback"]`). Prepared Forwards are cached per model object, keyed by
item shape, batch, device, precision, compile and the weights' version counters (a weight changed in
place gets a fresh copy).

Batch: `batch` as given, or, for large runs (core.calibrate: work >= CALIBRATE_MIN_FLOPS, or
`calibrate=True`, or CARCERT_BATCH_CALIBRATION=on), the candidate batch of highest measured
throughput on the channels_last form (timed once per machine, model architecture and shape, then
cached on disk), before compiling for it; `Forward.batch` is what runs, and describe() then says
`batch_calibrated: true` and `batch_requested`. Callers batch their inputs by Forward.batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from core.calibrate import CALIBRATE_MIN_FLOPS, calibration_setting, should_calibrate

PRECISIONS = ("fp32", "bf16")
FORM_ENV = "CARCERT_FORWARD"
FORMS = ("eager", "channels_last", "compiled")
COMPILE_MIN_FLOPS = 3e13
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Forward]] = weakref.WeakKeyDictionary()


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def form_setting() -> str:
    """CARCERT_FORWARD: "auto" or one of FORMS (unset or empty: auto; anything else: ValueError)."""
    value = os.environ.get(FORM_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", *FORMS):
        raise ValueError(f"{FORM_ENV} must be auto, {', '.join(FORMS)}; got {value!r}")
    return value


def flops_per_forward(model: nn.Module, item_shape: tuple[int, ...], device: torch.device) -> int:
    """FLOPs of one forward of a single zero input (torch.utils.flop_counter; 0 if it cannot count)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *item_shape), device=device))
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a model the counter cannot trace is simply not compiled by auto
        return 0


def should_compile(
    model: nn.Module,
    item_shape: tuple[int, ...],
    device: torch.device,
    work: int,
    compile: bool | None = None,
) -> bool:  # noqa: A002 - torch's word
    """The compile policy of the module docstring for `work` forwards."""
    setting = form_setting()
    if setting != "auto":
        return setting == "compiled"
    if compile is not None:
        return compile
    params = sum(p.numel() for p in model.parameters())
    pixels = math.prod(item_shape[1:]) if len(item_shape) > 1 else 1
    if work * 2 * params * pixels < COMPILE_MIN_FLOPS:  # no forward to count: cannot reach it
        return False
    return work * flops_per_forward(model, item_shape, device) >= COMPILE_MIN_FLOPS


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Forward:
    """forward(x) -> float32 logits in the prepared form (module docstring)."""

    net: nn.Module  # eager: the model itself; otherwise its channels_last copy
    device: torch.device
    precision: str
    batch: int
    channels_last: bool = False
    compiled: Callable[[Tensor], Tensor] | None = None
    fallback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def form(self) -> str:
        if self.compiled is not None:
            return "compiled"
        return "channels_last" if self.channels_last else "eager"

    def describe(self) -> dict[str, Any]:
        """What ran, for the certificate's software block."""
        return {
            "form": self.form,
            "precision": self.precision,
            "device": str(self.device),
            "batch": self.batch,
            "fallback": self.fallback,
            **self.extra,
        }

    def _fmt(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _run(self, x: Tensor) -> Tensor:
        if self.compiled is None or 2 * x.shape[0] < self.batch:
            return self.net(self._fmt(x))
        if x.shape[0] == self.batch:
            return self.compiled(self._fmt(x))
        pad = x.new_zeros((self.batch - x.shape[0], *x.shape[1:]))
        return self.compiled(self._fmt(torch.cat([x, pad])))[: x.shape[0]]

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = [self._run(chunk).float() for chunk in x.split(self.batch)]
        return out[0] if len(out) == 1 else torch.cat(out)


def _weights_version(model: nn.Module) -> tuple:
    try:
        return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:  # inference tensors carry no version counter: key on identity only
        return tuple(id(t) for t in (*model.parameters(), *model.buffers()))


def _compile(fwd: Forward, item_shape: tuple[int, ...]) -> None:
    """fwd.compiled = torch.compile(fwd.net), warmed up on one zero batch; on failure fwd.fallback."""
    try:
        # default mode on CUDA too: CUDA graphs ("reduce-overhead") reuse their output buffers
        # between calls and autotuning compiles for minutes; neither was measured (no GPU lent)
        compiled = torch.compile(fwd.net, dynamic=False)
        warm = torch.zeros((fwd.batch, *item_shape), device=fwd.device)
        with torch.inference_mode(), _autocast(fwd.device, fwd.precision):
            compiled(fwd._fmt(warm))
        fwd.compiled = compiled
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the exact eager form
        fwd.compiled = None
        first = (str(exc).splitlines() or [""])[0]
        fwd.fallback = f"torch.compile failed: {type(exc).__name__}: {first}"[:300]


def _device_notes(device: torch.device) -> dict[str, Any]:
    """On CUDA, whether TF32 (10-bit mantissa) may run float32 convolutions and matmuls: PyTorch's
    cudnn default allows it, so an "fp32" certificate on such a GPU says so."""
    if device.type != "cuda":
        return {}
    return {
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def _work_flops(model: nn.Module, item_shape: tuple[int, ...], device: torch.device, work: int) -> float:
    """FLOPs of `work` forwards; 0 when the parameter x pixel bound cannot reach CALIBRATE_MIN_FLOPS
    (nothing counted), or when CARCERT_BATCH_CALIBRATION forces the decision."""
    if calibration_setting() != "auto" or work <= 0:
        return 0.0
    params = sum(p.numel() for p in model.parameters())
    pixels = math.prod(item_shape[1:]) if len(item_shape) > 1 else 1
    if work * 2 * params * pixels < CALIBRATE_MIN_FLOPS:
        return 0.0
    return float(work) * flops_per_forward(model, item_shape, device)


def _calibrate(fwd: Forward, item_shape: tuple[int, ...], model: nn.Module) -> None:
    """fwd.batch = the calibrated batch (core.calibrate) of fwd's eager form, before any compile."""
    from core.calibrate import cache_key, calibrated_batch
    from core.datasets import forward_batch

    requested = fwd.batch
    cap = forward_batch(1 << 30, item_shape)  # the memory bound on one forward's inputs

    def run(b: int) -> None:
        x = torch.zeros((b, *item_shape), device=fwd.device)
        with torch.inference_mode(), _autocast(fwd.device, fwd.precision):
            fwd.net(fwd._fmt(x))
        if fwd.device.type == "cuda":
            torch.cuda.synchronize(fwd.device)

    key = cache_key(model, item_shape, fwd.device, fwd.precision, fwd.form, requested, cap)
    fwd.batch, _ = calibrated_batch(run, requested, cap, key)
    fwd.extra.update(batch_requested=requested, batch_calibrated=True)


def _build(
    model: nn.Module,
    item_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    precision: str,
    compile: bool,
    calibrate: bool = False,
) -> Forward:  # noqa: A002
    try:
        net = copy.deepcopy(model).eval().to(device=device, memory_format=torch.channels_last)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be copied runs as given
        return Forward(model, device, precision, batch, fallback=f"channels_last copy failed: {exc}"[:300])
    fwd = Forward(net, device, precision, batch, channels_last=True, extra=_device_notes(device))
    if calibrate:
        _calibrate(fwd, item_shape, model)
    if compile:
        _compile(fwd, item_shape)
    return fwd


def prepare_forward(
    model: nn.Module,
    item_shape: tuple[int, ...],
    batch: int,
    *,
    device: torch.device | str,
    precision: str = "fp32",
    work: int = 0,
    compile: bool | None = None,
    calibrate: bool | None = None,
) -> Forward:  # noqa: A002
    """The Forward of the eval-mode `model` (already on `device`) for inputs (N, *item_shape), in
    forward batches of `batch` (or the calibrated batch: Forward.batch), for a run of about `work`
    forwards (module docstring); cached."""
    device = torch.device(device)
    check_precision(precision)
    item_shape = tuple(int(s) for s in item_shape)
    eager = form_setting() == "eager" or len(item_shape) != 3  # channels_last needs (C, H, W) items
    want_compile = not eager and should_compile(model, item_shape, device, work, compile)
    want_calibrate = not eager and should_calibrate(_work_flops(model, item_shape, device, work), calibrate)
    key = (item_shape, int(batch), str(device), precision, eager, want_compile, want_calibrate,
           _weights_version(model))
    cached = _CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    if eager:
        return Forward(model, device, precision, int(batch), extra=_device_notes(device))
    fwd = _build(model, item_shape, int(batch), device, precision, want_compile, want_calibrate)
    if fwd.net is not model:  # only copies are cached (a value holding its key would never be freed)
        for old in [k for k in cached if k[:7] == key[:7]]:  # the same slot with stale weights
            del cached[old]
        cached[key] = fwd
    return fwd


__all__ = [
    "FORM_ENV",
    "FORMS",
    "COMPILE_MIN_FLOPS",
    "PRECISIONS",
    "Forward",
    "check_precision",
    "form_setting",
    "flops_per_forward",
    "prepare_forward",
    "should_compile",
]
