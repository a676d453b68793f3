"""Certification shards: one certification over S samples split into ranges of samples computed
anywhere (other processes, other workers) and merged into the certificate of the whole run.

Contract: for any number of shards, merge_results([certify_model(..., sample_range=r) for r in
shard_ranges(S, k, shard_alignment(spec, item_shape))]) equals certify_model(...) over all S samples
(records, evidence arrays, PCA, accuracy, forward_passes), so build_certificate gives the same
certificate body and evidence_sha256 bytes. It holds because every sample's deltas are seeded by
(seed, index) (core.certify.sample_deltas), the clean forwards of a shard run over the whole run's
batches, and shard boundaries fall on the whole run's sample-group boundaries (a group shares
forward batches, so a group is never split).

Partial results travel as one .npz per shard (save_partial / load_partial; no pickles).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from core.certify import CertificationResult, summarize
from core.context import ForwardingContext
from core.datasets import forward_batch
from core.errors import InvalidInput

# above this many forward passes (samples x (l n + 1)) a certification is split automatically when
# certification.shards is unset: about a minute of CPU for the small models
AUTO_SHARD_PASSES = 2_000_000
MAX_SHARDS = 64


def shard_alignment(spec: Any, item_shape: tuple[int, ...]) -> int:
    """Samples per sample group of core.certify (full sampling: ceil(batch / (l n)); early stop:
    ceil(batch / n)): shard boundaries are multiples of it."""
    bs = forward_batch(int(spec.batch_size), item_shape)
    per = int(spec.n) if getattr(spec, "early_stop", False) else int(spec.n) * int(spec.l)
    return max(1, math.ceil(bs / per))


def shard_count(spec: Any, samples: int) -> int:
    """How many shards a certification of `samples` samples runs as: certification.shards when set,
    else 1 below AUTO_SHARD_PASSES forward passes and one per AUTO_SHARD_PASSES above (<= MAX_SHARDS)."""
    explicit = getattr(spec, "shards", None)
    if explicit is not None:
        return max(1, min(int(explicit), samples))
    passes = samples * (int(spec.n) * int(spec.l) + 1)
    return max(1, min(MAX_SHARDS, samples, passes // AUTO_SHARD_PASSES))


def shard_ranges(samples: int, shards: int, alignment: int = 1) -> list[tuple[int, int]]:
    """`shards` contiguous ranges (a, b) covering 0..samples, as even as the alignment allows, every
    boundary but the last a multiple of `alignment`; fewer ranges when there are fewer aligned blocks."""
    if samples < 1 or shards < 1 or alignment < 1:
        raise InvalidInput("shard_ranges needs samples, shards and alignment >= 1")
    blocks = -(-samples // alignment)
    k = min(shards, blocks)
    bounds = [min(samples, (i * blocks // k) * alignment) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def merge_results(parts: list[CertificationResult]) -> CertificationResult:
    """The whole run's result from its shards (any order): the ranges must tile 0..S exactly and
    agree on params, bound order and forward form. Accuracy, PCA and forward_passes are recomputed
    over all samples; seconds is the sum of the shards' seconds."""
    if not parts:
        raise InvalidInput("no certification shards to merge")
    parts = sorted(parts, key=lambda r: int(r.indices[0]) if len(r.indices) else -1)
    first = parts[0]
    total = int(first.params["samples"])
    expected = 0
    for r in parts:
        if r.params != first.params or r.bound_order != first.bound_order or r.forward != first.forward:
            raise InvalidInput("certification shards of different runs cannot be merged")
        if len(r.indices) == 0 or int(r.indices[0]) != expected:
            raise InvalidInput(f"certification shards leave a gap or overlap at sample {expected}")
        expected = int(r.indices[-1]) + 1
    if expected != total:
        raise InvalidInput(f"certification shards cover {expected} of {total} samples")
    samples = [rec for r in parts for rec in r.samples]
    draws = np.concatenate([r.draws for r in parts])
    acc, pca = summarize(samples)
    return CertificationResult(
        samples=samples, z=np.concatenate([r.z for r in parts]), accuracy=acc, pca=pca,
        failure_probability=first.failure_probability, params=dict(first.params),
        bound_order=first.bound_order, p=np.concatenate([r.p for r in parts]),
        deltas=np.concatenate([r.deltas for r in parts]), labels=np.concatenate([r.labels for r in parts]),
        indices=np.concatenate([r.indices for r in parts]), seconds=float(sum(r.seconds for r in parts)),
        draws=draws, forward_passes=total + int(draws.sum()), forward=dict(first.forward),
    )


def save_partial(result: CertificationResult, path: Path) -> None:
    """Write a shard's result to `path` (.npz: the evidence arrays plus its records and scalars as
    JSON text), atomically."""
    path = Path(path)
    meta = {"samples": result.samples, "accuracy": result.accuracy, "pca": result.pca,
            "failure_probability": result.failure_probability, "params": result.params,
            "bound_order": result.bound_order, "seconds": result.seconds,
            "forward_passes": result.forward_passes, "forward": result.forward}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, z=result.z, deltas=result.deltas, p=result.p, labels=result.labels, indices=result.indices,
             draws=result.draws, meta=np.array(json.dumps(meta, sort_keys=True)))
    tmp.replace(path)


def load_partial(path: Path) -> CertificationResult:
    """A shard's result written by save_partial (never unpickles)."""
    try:
        with np.load(Path(path), allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("z", "deltas", "p", "labels", "indices", "draws")}
            meta = json.loads(str(f["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInput(f"cannot read certification shard {path}: {exc}") from exc
    return CertificationResult(
        samples=meta["samples"], z=arrays["z"], accuracy=meta["accuracy"], pca=meta["pca"],
        failure_probability=meta["failure_probability"], params=meta["params"],
        bound_order=meta["bound_order"], p=arrays["p"], deltas=arrays["deltas"], labels=arrays["labels"],
        indices=arrays["indices"], seconds=float(meta["seconds"]), draws=arrays["draws"],
        forward_passes=int(meta["forward_passes"]), forward=meta["forward"],
    )


def certify_ranges(spec: Any, x: Any) -> list[tuple[int, int]]:
    """The shard ranges of certifying the first spec.samples rows of x (shard_count, aligned)."""
    samples = min(int(spec.samples), int(x.shape[0]))
    if samples < 1:
        raise InvalidInput("no test samples to certify")
    return shard_ranges(samples, shard_count(spec, samples), shard_alignment(spec, tuple(x.shape[1:])))


class _ShardProgress(ForwardingContext):
    """A context whose "certify" progress of rows a..b is reported as a fraction of all S rows."""

    def __init__(self, ctx: Any, a: int, b: int, total: int) -> None:
        super().__init__(ctx)
        self.a, self.b, self.total = a, b, total

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.ctx.progress(stage, (self.a + fraction * (self.b - self.a)) / self.total, message)


def certify_in_shards(model: Any, x: Any, y: Any, transform: Any, spec: Any, *, seed: int, device: Any,
                      ctx: Any, folder: Path, only: int | None = None) -> CertificationResult | None:
    """certify_model over certify_ranges(spec, x), shard by shard: a shard whose partial
    <folder>/shards/<i>.npz exists (computed by another worker) is loaded, any other is computed and
    saved; returns the merged result (= the unsharded run's). With `only` = i: just shard i (saved;
    returns None; nothing when the spec has fewer shards)."""
    from core.certify import certify_model

    ranges = certify_ranges(spec, x)
    total = ranges[-1][1]
    parts = []
    for i, (a, b) in enumerate(ranges):
        if only is not None and i != only:
            continue
        path = Path(folder) / "shards" / f"{i}.npz"
        if path.is_file():
            parts.append(load_partial(path))
            continue
        sctx = ctx if ctx is None or only is not None else _ShardProgress(ctx, a, b, total)
        part = certify_model(model, x, y, transform, spec, seed=seed, device=device, ctx=sctx,
                             checkpoint_key=f"certify-shard-{i}", sample_range=(a, b))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_partial(part, path)
        parts.append(part)
    return None if only is not None else merge_results(parts)


__all__ = ["AUTO_SHARD_PASSES", "certify_in_shards", "certify_ranges", "load_partial", "merge_results",
           "save_partial", "shard_alignment", "shard_count", "shard_ranges"]
