"""Preprocessing contract (JobSpec.preprocess, CLI --resize/--crop/--mean/--std).

    image file / array -> resize R (shorter side) -> center crop C  -> x in [0, 1]   (data side)
    x -> T(x, delta) -> (x - mean) / std per channel -> network                      (model side)

Resize and crop act when the data is read (core.datasets.Geometry), so every consumer, the semantic
transformation T included, sees raw [0, 1] images of the model's input size. The channel
normalisation belongs to the model: `attach_normalize` makes the network normalise its own input
(a forward pre-hook running a `Normalize` module; parameter names, state dict, masks and saved
weights stay exactly those of the plain network), and `Preprocessed(net, normalize)` is the plain
nn.Module wrapper every exporter wraps (torch.export .pt2, ONNX), so a deployed model takes raw
[0, 1] images. The whole preprocess is recorded in the certificate (model.preprocess) and in the
weights' metadata ("preprocess", JSON).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel of (B, C, H, W); mean / std are non-persistent buffers (they
    never enter a state dict)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise ValueError("mean and std need one value per channel, as many of each")
        if any(float(s) <= 0 for s in std):
            raise ValueError("std must be > 0")
        self.register_buffer(
            "mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def describe(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


class Preprocessed(nn.Module):
    """net(normalize(x)): the exported form of a network that normalises its raw [0, 1] input."""

    def __init__(self, net: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


class _NormalizeHook:
    """Forward pre-hook: the module's input x becomes normalize(x)."""

    def __init__(self, normalize: Normalize) -> None:
        self.normalize = normalize

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        norm = self.normalize
        if norm.mean.device != x.device:
            norm.to(x.device)
        return (norm(x), *args[1:])


def normalize_of(model: nn.Module) -> Normalize | None:
    """The Normalize attached to `model` by attach_normalize, or None."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, _NormalizeHook):
            return hook.normalize
    return None


def attach_normalize(model: nn.Module, normalize: Normalize | None) -> nn.Module:
    """Make `model` compute f(normalize(x)) (in place; no-op for None), and return it. Deep copies
    keep the hook; core.car.fold_batchnorm carries it over to the folded network (`copy_normalize`)."""
    if normalize is None:
        return model
    if normalize_of(model) is not None:
        raise ValueError("the model already normalises its input")
    model.register_forward_pre_hook(_NormalizeHook(normalize))
    return model


def copy_normalize(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give `dst` (e.g. a traced copy of `src`) the input normalisation of `src`, if any."""
    norm = normalize_of(src)
    if norm is not None and normalize_of(dst) is None:
        attach_normalize(dst, copy.deepcopy(norm))
    return dst


def exportable(model: nn.Module) -> nn.Module:
    """What an exporter exports: Preprocessed(net without its hook, normalize) when `model`
    normalises its input, else `model` itself (a copy: the caller's model is untouched)."""
    net = copy.deepcopy(model)
    norm = normalize_of(net)
    if norm is None:
        return net
    for key, hook in list(net._forward_pre_hooks.items()):
        if isinstance(hook, _NormalizeHook):
            del net._forward_pre_hooks[key]
    return Preprocessed(net, norm)


def preprocess_dict(spec: Any) -> dict[str, Any] | None:
    """JSON-able {resize, crop, mean, std} of a core.spec.PreprocessSpec, None when it does nothing."""
    if spec is None:
        return None
    d = {"resize": spec.resize, "crop": spec.crop, "mean": spec.mean, "std": spec.std}
    return d if any(v is not None for v in d.values()) else None


def normalize_for(spec: Any, in_channels: int) -> Normalize | None:
    """The Normalize of a PreprocessSpec (None without mean/std); one value is broadcast over all
    channels, otherwise there must be one per channel."""
    if spec is None or spec.mean is None:
        return None
    mean, std = list(spec.mean), list(spec.std)
    for name, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, in_channels):
            raise ValueError(
                f"preprocess.{name} has {len(vals)} values; the data has {in_channels} channel(s)"
            )
    return Normalize(
        mean * in_channels if len(mean) == 1 else mean, std * in_channels if len(std) == 1 else std
    )


def metadata_entry(spec: Any) -> dict[str, str]:
    """{"preprocess": JSON} for the weights' safetensors metadata ({} without a preprocess)."""
    d = preprocess_dict(spec)
    return {} if d is None else {"preprocess": json.dumps(d, sort_keys=True)}
