"""Semantic transformations T(x, delta), delta in [0, 1] (METHOD.md "Semantic transformation").

Every transform maps a batch x (B, C, H, W) in [0, 1] and intensities delta (B,) in [0, 1] to a
batch of the same shape, clamped to [0, 1], on x's device, deterministic given its inputs.
`index` (B,) holds dataset indices; only `precomputed` needs it. Built with `build_transform`.

kind = "parametric" (differentiable in x where natural; delta = 0 is exactly the identity).
With s = spec.strength, the documented range at delta = 1 is (also in `PARAMETRIC`):

    name          formula                                                  at delta = 1, s = 1
    brightness    x + 0.3 s delta                                          +0.3 intensity
    contrast      m + (x - m)(1 - 0.5 s delta), m = per-image mean          contrast x0.5
    gamma         x ** (1 + s delta)                                       gamma 2 (darker)
    illumination  x + s delta (0.3 g(h, w) + c)  ("sunlight"): g = 1 at the top-left corner
                  falling linearly to 0 at the bottom-right, c = (+0.08, +0.03, -0.05) warm
                  RGB cast (3-channel images only; other channel counts get the gradient only)
    blur          gaussian blur, sigma = 1.5 s delta pixels (kernel radius ceil(4.5 s))
    rotation      rotate by 30 s delta degrees (counter-clockwise), bilinear, border padding
    translation   shift by 0.15 s delta of the width right and of the height down
    scale         zoom in by the factor 1 + 0.3 s delta about the centre
    "a+b"         apply a, then b, each with the same delta (any number of '+' parts)

Factors are clipped where they would leave their domain (contrast factor >= 0).

kind = "latent": x' = G(E(x) + delta * ||delta_max|| * s_dir) (METHOD.md).
  * built-in PCA generator (spec.encoder is None): PCA fitted on the first training samples
    (at most 5000, and at most 5e7 values: ~330 images at 3x224x224), sklearn PCA (exact SVD
    when min(samples, dimension) <= 2000, else randomized SVD), random_state = 0. With the full
    orthonormal PCA basis E(x) = V(x - mu), G(z) = mu + V^T z, so G(E(x) + a e_c) = x + a v_c
    exactly: the transform adds a times the principal component v_c (c = spec.component; sign
    fixed so that sum(v_c) >= 0, i.e. +delta mostly brightens).
    ||delta_max|| = 3 * std of the training codes along v_c * spec.strength.
  * user generator: spec.encoder / spec.decoder are torch.export .pt2 files (loaded with
    torch.export.load under weights_only, pickled payloads refused). E maps (B, C, H, W) to
    codes (B, ...), G maps codes back to images (reshaped to x's shape, clamped); s_dir is the unit
    vector of latent coordinate spec.component (of the flattened code); ||delta_max|| = 3 * std of
    that coordinate over (at most 5000) encoded training images * spec.strength, or
    spec.strength when no data is given. Here delta = 0 gives G(E(x)), the reconstruction.

kind = "precomputed": the dataset npz ships, per split (`_test` / `_train`), the arrays
    variants_<split>        (N, V, C, H, W)  transformed variants of each sample (uint8 0..255 or
                                             float 0..1), sample i of the split <-> variants[i]
    variant_deltas_<split>  (N, V)           the delta of each variant in [0, 1] (optional; default
                                             j / (V - 1))
  which core.data puts into DatasetSplit.extras. T(x, delta, index) returns, for each row, the
  variant of sample index[b] whose recorded delta is nearest to delta[b] (ties: lowest j); with
  delta ~ U[0, 1] certification thus draws among the shipped variants, and delta = 1 picks the
  strongest one. x itself is ignored apart from its shape, dtype and device.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import TransformError

PARAMETRIC: dict[str, str] = {
    "brightness": "x + 0.3*s*delta (additive, +0.3 at delta=1)",
    "contrast": "mean + (x - mean)*(1 - 0.5*s*delta) (contrast x0.5 at delta=1)",
    "gamma": "x ** (1 + s*delta) (gamma 2 at delta=1)",
    "illumination": "x + s*delta*(0.3*g(h,w) + c): sunlight gradient 0.3 at the top-left to 0 at the "
    "bottom-right plus warm RGB cast c=(+0.08,+0.03,-0.05) (3 channels only)",
    "blur": "gaussian blur, sigma = 1.5*s*delta pixels",
    "rotation": "rotation by 30*s*delta degrees",
    "translation": "shift by 0.15*s*delta of width (right) and height (down)",
    "scale": "zoom in by 1 + 0.3*s*delta",
}
KINDS = ("parametric", "latent", "precomputed")
WARM_CAST = (0.08, 0.03, -0.05)
PCA_FIT_MAX = 5000  # training samples used to fit the PCA / scale a user generator
PCA_FIT_VALUES = 50_000_000  # and at most this many values (samples x dimension): large images


def _as_delta(delta: Tensor | float, x: Tensor) -> Tensor:
    d = torch.as_tensor(delta, dtype=x.dtype, device=x.device)
    if d.ndim == 0:
        d = d.expand(x.shape[0])
    if d.shape != (x.shape[0],):
        raise TransformError(f"delta must have shape ({x.shape[0]},), got {tuple(d.shape)}")
    return d


class SemanticTransform:
    """T(x, delta, index=None) -> x' (see the module docstring); describe() is JSON-able."""

    def __call__(self, x: Tensor, delta: Tensor | float, index: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


# ---------------------------------------------------------------- parametric primitives
def _brightness(x: Tensor, d: Tensor, s: float) -> Tensor:
    return x + 0.3 * s * d.view(-1, 1, 1, 1)


def _contrast(x: Tensor, d: Tensor, s: float) -> Tensor:
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    k = (1.0 - 0.5 * s * d).clamp(min=0.0).view(-1, 1, 1, 1)
    return m + (x - m) * k


def _gamma(x: Tensor, d: Tensor, s: float) -> Tensor:
    return x.clamp(0.0, 1.0) ** (1.0 + s * d).view(-1, 1, 1, 1)


def _gradient(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """g(h, w): 1 at the top-left pixel, 0 at the bottom-right, linear in (u + v) / 2."""
    u = torch.linspace(0.0, 1.0, h, device=device, dtype=dtype).view(h, 1)
    v = torch.linspace(0.0, 1.0, w, device=device, dtype=dtype).view(1, w)
    return (1.0 - (u + v) / 2.0).view(1, 1, h, w)


def _illumination(x: Tensor, d: Tensor, s: float) -> Tensor:
    _, c, h, w = x.shape
    add = 0.3 * _gradient(h, w, x.device, x.dtype).expand(1, c, h, w)
    if c == 3:
        add = add + torch.tensor(WARM_CAST, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x + s * d.view(-1, 1, 1, 1) * add


def _blur(x: Tensor, d: Tensor, s: float) -> Tensor:
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * 1.5 * s))  # fixed by s, so results do not depend on the batch
    sigma = (1.5 * s * d).view(b, 1)
    i = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
    safe = sigma.clamp(min=1e-6)
    k = torch.exp(-(i**2) / (2 * safe**2))
    k = torch.where(sigma > 1e-6, k, (i == 0).to(x.dtype))
    k = k / k.sum(dim=1, keepdim=True)  # (B, K)
    kk = k.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, kk.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kk.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rotation(x: Tensor, d: Tensor, s: float) -> Tensor:
    a = torch.deg2rad(30.0 * s * d)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # output pixel p samples input at R(-a) p: the content turns counter-clockwise by a
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _translation(x: Tensor, d: Tensor, s: float) -> Tensor:
    t = 2.0 * 0.15 * s * d  # normalised coordinates span 2
    one, zero = torch.ones_like(d), torch.zeros_like(d)
    theta = torch.stack([torch.stack([one, zero, -t], 1), torch.stack([zero, one, -t], 1)], 1)
    return _affine(x, theta)


def _scale(x: Tensor, d: Tensor, s: float) -> Tensor:
    z = 1.0 / (1.0 + 0.3 * s * d)
    zero = torch.zeros_like(d)
    theta = torch.stack([torch.stack([z, zero, zero], 1), torch.stack([zero, z, zero], 1)], 1)
    return _affine(x, theta)


_PRIMITIVES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "gamma": _gamma,
    "illumination": _illumination,
    "blur": _blur,
    "rotation": _rotation,
    "translation": _translation,
    "scale": _scale,
}


class ParametricTransform(SemanticTransform):
    """A built-in transform or a composition 'a+b' (module docstring table)."""

    def __init__(self, name: str, strength: float = 1.0) -> None:
        parts = [p.strip() for p in name.split("+")]
        bad = [p for p in parts if p not in _PRIMITIVES]
        if not parts or bad:
            raise TransformError(
                f"unknown parametric transform {name!r}; valid names: {', '.join(PARAMETRIC)} "
                "(or compositions such as 'brightness+blur')"
            )
        self.parts = parts
        self.strength = float(strength)

    def __call__(self, x: Tensor, delta: Tensor | float, index: Tensor | None = None) -> Tensor:
        d = _as_delta(delta, x)
        y = x
        for p in self.parts:
            y = _PRIMITIVES[p](y, d, self.strength).clamp(0.0, 1.0)
        # delta = 0 is exactly the identity (interpolation round-off removed)
        return torch.where((d == 0).view(-1, 1, 1, 1), x.clamp(0.0, 1.0), y)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "parametric",
            "name": "+".join(self.parts),
            "strength": self.strength,
            "range_at_delta_1": {p: PARAMETRIC[p] for p in self.parts},
        }


# ---------------------------------------------------------------- latent
class PCADirection(SemanticTransform):
    """Built-in PCA generator: x' = x + delta * magnitude * v_c (module docstring)."""

    def __init__(self, direction: Tensor, magnitude: float, component: int, strength: float,
                 explained_variance: float, fitted_on: int) -> None:
        self.direction = direction.detach().to(torch.float32).cpu()  # (C, H, W), unit norm
        self.magnitude = float(magnitude)
        self.component = component
        self.strength = strength
        self.explained_variance = explained_variance
        self.fitted_on = fitted_on
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def fit(cls, train_x: Tensor, component: int = 0, strength: float = 1.0) -> PCADirection:
        from sklearn.decomposition import PCA

        dim = int(np.prod(train_x.shape[1:]))
        keep = min(PCA_FIT_MAX, max(200, PCA_FIT_VALUES // max(1, dim)))
        x = train_x[:keep].detach().to(torch.float64).cpu()
        flat = x.reshape(x.shape[0], -1).numpy()
        k = component + 1
        if k > min(flat.shape):
            raise TransformError(
                f"PCA component {component} does not exist: at most {min(flat.shape)} components "
                f"from {flat.shape[0]} training samples of dimension {flat.shape[1]}"
            )
        # exact SVD for small problems; seeded randomized SVD (a few components) for large images
        solver = "full" if min(flat.shape) <= 2000 else "randomized"
        pca = PCA(n_components=k, svd_solver=solver, random_state=0).fit(flat)
        v = pca.components_[component].astype(np.float64)
        if v.sum() < 0:
            v = -v
        codes = (flat - pca.mean_) @ v
        magnitude = 3.0 * float(codes.std()) * strength
        direction = torch.from_numpy(v).reshape(x.shape[1:])
        return cls(direction, magnitude, component, strength,
                   float(pca.explained_variance_ratio_[component]), int(x.shape[0]))

    def _dir(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.direction.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def __call__(self, x: Tensor, delta: Tensor | float, index: Tensor | None = None) -> Tensor:
        d = _as_delta(delta, x)
        if x.shape[1:] != self.direction.shape:
            raise TransformError(f"PCA direction has shape {tuple(self.direction.shape)}, "
                                 f"images have {tuple(x.shape[1:])}")
        y = (x + (self.magnitude * d).view(-1, 1, 1, 1) * self._dir(x)).clamp(0.0, 1.0)
        return torch.where((d == 0).view(-1, 1, 1, 1), x.clamp(0.0, 1.0), y)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "latent",
            "generator": "pca",
            "component": self.component,
            "strength": self.strength,
            "delta_max_norm": self.magnitude,
            "explained_variance_ratio": self.explained_variance,
            "fitted_on": self.fitted_on,
            "direction_sha256": hashlib.sha256(self.direction.numpy().tobytes()).hexdigest(),
        }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_exported(path: str | Path) -> Callable[[Tensor], Tensor]:
    """Load a torch.export .pt2 program without executing pickled code (core.program.read_program:
    pickled weights/constants, custom or opaque objects, legacy and AOTInductor payloads are
    refused, and torch.load is forced to weights_only=True while torch.export.load runs)."""
    from core.program import read_program

    p = Path(path)
    if not p.is_file():
        raise TransformError(f"generator file not found: {p}")
    return read_program(p, error=TransformError).module()


class LatentGenerator(SemanticTransform):
    """User encoder/decoder: x' = G(E(x) + delta * magnitude * e_c)."""

    def __init__(self, encoder: Callable[[Tensor], Tensor], decoder: Callable[[Tensor], Tensor],
                 component: int, magnitude: float, strength: float, info: dict[str, Any]) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.component, self.magnitude, self.strength, self.info = component, magnitude, strength, info

    def __call__(self, x: Tensor, delta: Tensor | float, index: Tensor | None = None) -> Tensor:
        d = _as_delta(delta, x)
        z = self.encoder(x)
        flat = z.reshape(z.shape[0], -1)
        if self.component >= flat.shape[1]:
            raise TransformError(
                f"latent component {self.component} out of range (code size {flat.shape[1]})"
            )
        shift = torch.zeros_like(flat)
        shift[:, self.component] = self.magnitude * d.to(flat.dtype)
        out = self.decoder((flat + shift).reshape(z.shape))
        if out.numel() != x.numel():
            raise TransformError(f"decoder output has {out.numel() // x.shape[0]} values per sample, "
                                 f"images have {x[0].numel()}")
        return out.reshape(x.shape).to(x.dtype).clamp(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "latent", "generator": "export", "component": self.component,
                "strength": self.strength, "delta_max_norm": self.magnitude, **self.info}


# ---------------------------------------------------------------- precomputed
class PrecomputedVariants(SemanticTransform):
    """Draws, per row, the shipped variant whose delta is nearest to the requested delta."""

    def __init__(self, variants: Tensor, deltas: Tensor | None, split: str) -> None:
        if variants.ndim != 5:
            raise TransformError(f"variants_{split} must be (N, V, C, H, W), got {tuple(variants.shape)}")
        n, v = variants.shape[:2]
        if deltas is None:
            deltas = torch.linspace(0.0, 1.0, v).expand(n, v) if v > 1 else torch.ones(n, 1)
        if tuple(deltas.shape) != (n, v):
            raise TransformError(f"variant_deltas_{split} must be ({n}, {v}), got {tuple(deltas.shape)}")
        self.variants = variants
        self.deltas = deltas.to(torch.float64)
        self.split = split

    def __call__(self, x: Tensor, delta: Tensor | float, index: Tensor | None = None) -> Tensor:
        if index is None:
            raise TransformError("precomputed transforms need the dataset indices of the batch")
        d = _as_delta(delta, x).detach().to("cpu", torch.float64)
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        if idx.shape != (x.shape[0],) or idx.min() < 0 or idx.max() >= self.variants.shape[0]:
            raise TransformError(f"indices out of range for {self.variants.shape[0]} precomputed samples")
        j = (self.deltas[idx] - d.view(-1, 1)).abs().argmin(dim=1)  # first minimum on ties
        out = self.variants[idx, j]
        if out.dtype == torch.uint8:
            out = out.to(torch.float32) / 255.0
        if tuple(out.shape) != tuple(x.shape):
            raise TransformError(f"variants have shape {tuple(out.shape[1:])}, images {tuple(x.shape[1:])}")
        return out.to(device=x.device, dtype=x.dtype).clamp(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "precomputed", "split": self.split,
                "variants_per_sample": int(self.variants.shape[1]),
                "selection": "variant with the recorded delta nearest to delta"}


# ---------------------------------------------------------------- factory
def build_transform(spec: Any, *, data: Any = None, split: str = "test") -> SemanticTransform:
    """TransformSpec (core.spec) -> SemanticTransform. `data` (core.data.DatasetSplit) is needed
    for latent (fitting / scale) and precomputed (variants) kinds."""
    kind = getattr(spec, "kind", None)
    if kind == "parametric":
        return ParametricTransform(spec.name, spec.strength)
    if kind == "latent":
        if spec.encoder is None and spec.decoder is None:
            if data is None:
                raise TransformError("the built-in PCA generator is fitted on the training split: give data")
            return PCADirection.fit(data.train_x, spec.component, spec.strength)
        if spec.encoder is None or spec.decoder is None:
            raise TransformError("a latent generator needs both encoder and decoder .pt2 files")
        enc, dec = load_exported(spec.encoder), load_exported(spec.decoder)
        magnitude = float(spec.strength)
        if data is not None:
            with torch.no_grad():
                z = enc(data.train_x[:PCA_FIT_MAX].to(torch.float32))
            flat = z.reshape(z.shape[0], -1)
            if spec.component >= flat.shape[1]:
                raise TransformError(f"latent component {spec.component} out of range "
                                     f"(code size {flat.shape[1]})")
            magnitude = 3.0 * float(flat[:, spec.component].double().std(unbiased=False)) * spec.strength
        info = {"encoder_sha256": _file_sha256(Path(spec.encoder)),
                "decoder_sha256": _file_sha256(Path(spec.decoder))}
        return LatentGenerator(enc, dec, spec.component, magnitude, float(spec.strength), info)
    if kind == "precomputed":
        if split not in ("test", "train"):
            raise TransformError(f"split must be 'test' or 'train', got {split!r}")
        extras = getattr(data, "extras", None) or {}
        key = f"variants_{split}"
        if key not in extras:
            raise TransformError(f"precomputed transform needs the dataset array {key!r} "
                                 "(N, V, C, H, W) in the npz; see core.transforms")
        return PrecomputedVariants(torch.as_tensor(extras[key]),
                                   None if f"variant_deltas_{split}" not in extras
                                   else torch.as_tensor(extras[f"variant_deltas_{split}"]), split)
    raise TransformError(f"unknown transform kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def transform_description(t: SemanticTransform) -> dict[str, Any]:
    """describe() round-tripped through JSON (what the certificate records)."""
    return json.loads(json.dumps(t.describe(), sort_keys=True))


__all__ = ["KINDS", "PARAMETRIC", "SemanticTransform", "ParametricTransform", "PCADirection",
           "LatentGenerator", "PrecomputedVariants", "build_transform", "load_exported",
           "transform_description"]
