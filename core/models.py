"""Architecture registry and safe weight loading.

Every model takes float inputs in [0, 1] of shape (N, C, H, W) (no normalisation inside) and returns
logits (N, num_classes). The torchvision architectures are built with ``weights=None``; the first
convolution is adapted to ``in_channels``, and ``small_input=True`` removes the stride-2 stem /
max-pool so that 8x8, 28x28 and 32x32 inputs keep a useful spatial size.

User weight files are never unpickled with code execution: ``.safetensors`` (detected by content, not
only by suffix) through safetensors, anything else through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from core.errors import InvalidInput, WeightsError

ARCHS = ("small_cnn", "resnet18", "mobilenet_v2", "googlenet")


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels) with BatchNorm + ReLU, one 2x2 max-pool, a 2x2
    adaptive average pool and a linear classifier (~27k parameters): trains to ~97% on 8x8 digits in
    one epoch on a CPU core; any input size >= 2x2."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(64 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _resnet18(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _mobilenet_v2(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    if small_input or in_channels != 3:
        conv = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1 if small_input else 2, padding=1,
                         bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # torchvision's init for this layer
        model.features[0][0] = conv
    return model


def _googlenet(num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    from torchvision.models import googlenet

    model = googlenet(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True,
                      transform_input=False)
    if small_input or in_channels != 3:
        if small_input:
            conv = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool1 = nn.Identity()
        else:
            conv = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.01, a=-2, b=2)  # torchvision's init
        model.conv1.conv = conv
    return model


def build_model(arch: str, num_classes: int, in_channels: int, *, small_input: bool = True) -> nn.Module:
    """A freshly initialised ``arch`` (random init from the global torch RNG: seed it first)."""
    if arch not in ARCHS:
        raise InvalidInput(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInput(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise InvalidInput(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if arch == "small_cnn":
        return SmallCNN(num_classes, in_channels)
    if arch == "resnet18":
        return _resnet18(num_classes, in_channels, small_input)
    if arch == "mobilenet_v2":
        return _mobilenet_v2(num_classes, in_channels, small_input)
    return _googlenet(num_classes, in_channels, small_input)


def default_small_input(height: int, width: int) -> bool:
    """small_input for images of this size: True up to 64 pixels on the short side (the ImageNet
    stems would shrink such inputs to a few pixels), False for larger (ImageNet-like) inputs.
    The same rule as `carcert certify --input-size auto`, so its models rebuild identically."""
    return min(int(height), int(width)) <= 64


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over every parameter of ``model``."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def canonical_safetensors(data: bytes) -> bytes:
    """Re-serialise a safetensors byte string with its JSON header's keys sorted (metadata
    included). The safetensors writer emits ``__metadata__`` in hash-map order, which changes from
    process to process; sorted, equal tensors + metadata always give equal bytes (and sha256).
    Tensor bytes and offsets are unchanged; the header is space-padded to a multiple of 8."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def canonicalize_safetensors(path: str | Path) -> str:
    """Rewrite a safetensors file in canonical form (see canonical_safetensors) atomically;
    returns the file's sha256."""
    path = Path(path)
    data = canonical_safetensors(path.read_bytes())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write ``model.state_dict()`` as canonical safetensors (atomically; equal weights and
    metadata give equal bytes) and return the file's sha256."""
    from safetensors.torch import save

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = canonical_safetensors(save(state, metadata=meta))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _is_safetensors(path: Path) -> bool:
    """Content sniff: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def torch_load_safely(path: Path) -> object:
    """A torch checkpoint read on the CPU with torch.load(weights_only=True): the restricted
    unpickler refuses any global that is not a tensor / container type, so code inside the pickle
    is never run. torch's exception propagates; each caller words it for its user."""
    return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_state_dict(obj: object) -> Mapping | None:
    """The state_dict in a loaded checkpoint ({"state_dict": ...} and {"model": ...} unwrapped), or
    None when it holds no non-empty mapping."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        return None
    return obj


def non_tensor_keys(state: Mapping) -> list[str]:
    """Keys of a state_dict whose value is not a tensor."""
    return [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if _is_safetensors(path) or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, json errors: all "cannot read"
            raise WeightsError(f"cannot read safetensors file {path.name}: {exc}") from None
    else:
        try:
            obj = torch_load_safely(path)
        except Exception as exc:  # UnpicklingError (code in the pickle), truncated zip, ...
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsError(
                f"cannot load {path.name} safely (only safetensors or plain tensor state_dicts are "
                f"accepted; pickled code is refused): {msg}"
            ) from None
    obj = unwrap_state_dict(obj)
    if obj is None:
        raise WeightsError(f"{path.name} does not hold a state_dict (a non-empty mapping name -> tensor)")
    bad = non_tensor_keys(obj)
    if bad:
        raise WeightsError(f"{path.name}: entries that are not tensors: {', '.join(bad[:10])}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model`` in place after checking keys, shapes and finiteness.

    Missing BatchNorm ``num_batches_tracked`` counters (old torchvision checkpoints) are tolerated.
    Any other mismatch raises WeightsError listing missing, unexpected and mismatched keys (with
    both shapes)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if items:
                shown = "; ".join(items[:20]) + (f"; ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title} keys: {shown}")
        name = type(model).__name__
        raise WeightsError(f"{path.name} does not fit the model ({name}): " + " | ".join(parts))
    full: dict[str, torch.Tensor] = {}
    for k, ref in expected.items():
        if k not in state:
            full[k] = ref  # a num_batches_tracked counter
            continue
        v = state[k]
        if v.is_floating_point() or v.is_complex():
            if not bool(torch.isfinite(v).all()):
                raise WeightsError(f"{path.name}: tensor {k!r} contains NaN or inf values")
        elif ref.is_floating_point():
            raise WeightsError(f"{path.name}: tensor {k!r} has dtype {v.dtype}, expected a float tensor")
        full[k] = v.to(ref.dtype)
    model.load_state_dict(full, strict=True)


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} when none)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise WeightsError(f"{path.name}: safetensors header too large")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


__all__ = [
    "ARCHS",
    "SmallCNN",
    "build_model",
    "canonical_safetensors",
    "canonicalize_safetensors",
    "count_parameters",
    "default_small_input",
    "file_sha256",
    "load_weights",
    "save_weights",
    "weights_metadata",
]
