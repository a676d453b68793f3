"""CC-Cert probabilistic certification (paper Appendix A.4, Eq. 10-14; METHOD.md "CC-Cert").

Per test sample x with label y: p = softmax(f(x)) (float64), margin d = (p1 - p2) / 2. For each of
l repeats j, draw n intensities delta ~ U[0, 1] and compute Z_ji = ||p - p(T(x, delta_ji))||_inf.
Eq. 13, in log space (log-sum-exp, float64, no overflow at t = 1e4):

    log Y_j(t) = logsumexp_i(t Z_ji) - log n - t d

on the log grid t = geomspace(t_min, t_max, t_steps). Bound orders (both clipped at 1):
    conservative (default): eps_hat = min_t max_j Y_j(t) / alpha   (Eq. 14 holds at each fixed t)
    reference:              eps_hat = max_j min_t Y_j(t) / alpha   (the public CC-Cert code)
t_star is the grid point attaining the min (reference: that of the maximising repeat).
Failure probability of the estimate (Eq. 14, Cv = 1): (1 / (1 + n (1 - alpha)^2))^l.
A sample is certified iff argmax p = y and eps_hat <= epsilon; PCA (Eq. 10) = certified / samples.
With params.bound = "binomial" (core.bounds) the bound is instead the one-sided Clopper-Pearson upper
limit on P(Z >= d) from the k draws with Z >= d among the N = n l, at failure probability beta, and
that beta is the certificate's failure probability.

Early stopping (params.early_stop, core.bounds for the exact conditions): draws are taken one
repetition (n draws) at a time, in the order of the (l, n) array, and a sample stops once
core.bounds.stop_reason holds; its evidence is what was sampled (the rest of its z and deltas rows is
NaN, `draws` counts the sampled entries) and its record has epsilon_bound 1 (no claim), t_star None,
certified false: the decision of the full run with the same seed. forward_passes = samples (clean
passes) + total draws, for every run.

Deltas of sample `index` come from a torch.Generator seeded from (seed, index) (numpy SeedSequence),
drawn as an (l, n) float32 array, so results depend neither on batching nor on resuming.
The evidence file (npz) holds z (S, l, n), deltas (S, l, n), p (S, K), labels, indices, draws (S,); from it
`verify_certificate` recomputes every number of the certificate and compares bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import core
from core.bounds import GUARANTEES, check_bound, clopper_pearson_upper, stop_reason
from core.context import write_json
from core.datasets import forward_batch
from core.errors import Cancelled, InvalidInput
from core.fastforward import Forward, check_precision, prepare_forward
from core.masking import sparsity_report
from core.transforms import SemanticTransform

BOUND_ORDERS = ("conservative", "reference")
PARAM_KEYS = ("n", "l", "alpha", "epsilon", "t_min", "t_max", "t_steps", "seed", "samples")
# absent in older certificates
OPTIONAL_PARAMS = {"bound": "cccert", "beta": None, "early_stop": False, "precision": "fp32"}


# ----------------------------------------------------------------------------- the bound
def t_grid(t_min: float, t_max: float, t_steps: int) -> np.ndarray:
    """The temperatures: t_steps points, log-spaced over [t_min, t_max] (float64)."""
    if t_steps == 1:
        return np.array([float(t_min)])
    return np.geomspace(float(t_min), float(t_max), int(t_steps))


def margin(p: np.ndarray) -> np.ndarray:
    """d = (p1 - p2) / 2 over the last axis (p1 >= p2 the two largest probabilities)."""
    top2 = -np.sort(-np.asarray(p, dtype=np.float64), axis=-1)[..., :2]
    return (top2[..., 0] - top2[..., 1]) / 2.0


def log_y(z: np.ndarray, d: float, t: np.ndarray) -> np.ndarray:
    """log Y_j(t) of Eq. 13 for z (l, n): (l, T) float64, by a stable log-sum-exp over i."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty((z.shape[0], t.shape[0]), dtype=np.float64)
    log_n = math.log(z.shape[1])
    for j in range(z.shape[0]):
        tz = t[:, None] * z[j][None, :]  # (T, n)
        m = tz.max(axis=1)
        out[j] = m + np.log(np.exp(tz - m[:, None]).sum(axis=1)) - log_n - t * float(d)
    return out


def epsilon_bound(
    z: np.ndarray, d: float, alpha: float, t: np.ndarray, order: str = "conservative"
) -> tuple[float, float]:
    """(eps_hat, t_star) for one sample from z (l, n) (module docstring; clipped at 1)."""
    ly = log_y(z, d, t)  # (l, T)
    if order == "conservative":
        worst = ly.max(axis=0)  # max over repeats, per t
        k = int(np.argmin(worst))
        log_eps = float(worst[k])
    elif order == "reference":
        best_k = ly.argmin(axis=1)  # per repeat, the minimising t
        best = ly[np.arange(ly.shape[0]), best_k]
        j = int(np.argmax(best))
        k = int(best_k[j])
        log_eps = float(best[j])
    else:
        raise InvalidInput(f"bound order must be one of {BOUND_ORDERS}, got {order!r}")
    log_eps -= math.log(alpha)
    return (1.0 if log_eps >= 0.0 else math.exp(log_eps)), float(t[k])


def failure_probability(n: int, l: int, alpha: float) -> float:  # noqa: E741 - the paper's name
    """Eq. 14 with Cv = 1: probability that max_j Y_j / alpha underestimates the true bound."""
    return float((1.0 / (1.0 + n * (1.0 - alpha) ** 2)) ** l)


def sample_deltas(seed: int, index: int, l: int, n: int) -> Tensor:  # noqa: E741
    """The (l, n) float32 intensities of sample `index`: U[0, 1) from a generator seeded by
    SeedSequence([seed, index]) (independent of batching and resume)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.rand((l, n), generator=g, dtype=torch.float32)


def sample_record(index: int, label: int, p: np.ndarray, z: np.ndarray, params: dict[str, Any],
                  order: str, draws: int | None = None) -> dict[str, Any]:
    """The certificate entry of one sample, from its p (K,) and z (l, n) of which the first `draws`
    entries in row-major order were sampled (None: all). A sample with fewer draws than n l was
    stopped early (module docstring)."""
    d = float(margin(p))
    pred = int(np.argmax(p))
    total = int(params["n"]) * int(params["l"])
    m = total if draws is None else int(draws)
    sampled = np.asarray(z, dtype=np.float64).reshape(-1)[:m]
    failures = int(np.count_nonzero(sampled >= d))
    bound = params.get("bound", "cccert")
    t_star: float | None = None
    if m < total:
        eps = 1.0
    elif bound == "binomial":
        eps = clopper_pearson_upper(failures, total, params["beta"])
    else:
        t = t_grid(params["t_min"], params["t_max"], params["t_steps"])
        eps, t_star = epsilon_bound(z, d, params["alpha"], t, order)
    return {
        "index": int(index),
        "label": int(label),
        "pred": pred,
        "d": d,
        "max_z": float(sampled.max()) if m else None,
        "epsilon_bound": eps,
        "t_star": t_star,
        "certified": bool(m == total and pred == int(label) and eps <= params["epsilon"]),
        "draws": m,
        "failures": failures,
    }


def summarize(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """(accuracy, PCA of Eq. 10) over the certified samples' records."""
    s = max(1, len(samples))
    return (sum(r["pred"] == r["label"] for r in samples) / s, sum(r["certified"] for r in samples) / s)


# ----------------------------------------------------------------------------- the run
@dataclass
class CertificationResult:
    samples: list[dict[str, Any]]
    z: np.ndarray  # (S, l, n) float64 (NaN where a stopped sample was not sampled)
    accuracy: float
    pca: float
    failure_probability: float
    params: dict[str, Any]
    bound_order: str = "conservative"
    p: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (S, K) float64 clean probabilities
    deltas: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))  # (S, l, n)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0
    draws: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (S,) sampled entries
    forward_passes: int = 0  # S clean passes + draws.sum()
    forward: dict[str, Any] = field(default_factory=dict)  # what ran: core.fastforward.Forward.describe()


def _params(spec: Any, seed: int, samples: int) -> dict[str, Any]:
    bound = check_bound(str(getattr(spec, "bound", "cccert")))
    beta = float(getattr(spec, "failure_probability", 1e-3)) if bound == "binomial" else None
    return {
        "n": int(spec.n), "l": int(spec.l), "alpha": float(spec.alpha), "epsilon": float(spec.epsilon),
        "t_min": float(spec.t_min), "t_max": float(spec.t_max), "t_steps": int(spec.t_steps),
        "seed": int(seed), "samples": int(samples), "bound": bound, "beta": beta,
        "early_stop": bool(getattr(spec, "early_stop", False)),
        "precision": check_precision(str(getattr(spec, "precision", "fp32"))),
    }


def result_failure_probability(params: dict[str, Any]) -> float:
    """The certificate's failure probability: Eq. 14 for cccert, beta for binomial."""
    if params.get("bound", "cccert") == "binomial":
        return float(params["beta"])
    return failure_probability(params["n"], params["l"], params["alpha"])


def _fingerprint(params: dict[str, Any], x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def clean_probabilities(model: nn.Module | Forward, x: Tensor, batch_size: int) -> Tensor:
    """p = softmax(f(x)) in float64, (N, K) on the model's device; `model` may be a prepared
    core.fastforward.Forward."""
    out = [model(x[i:i + batch_size]).double().softmax(dim=1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def transformed_z(model: nn.Module | Forward, transform: SemanticTransform, xs: Tensor, p: Tensor,
                  sample_ids: Tensor, flat_d: Tensor, batch_size: int, offset: int = 0) -> np.ndarray:
    """Z = ||p[s] - softmax(f(T(xs[s], delta)))||_inf (float64) for each pair (s, delta) of the flat
    CPU `sample_ids` and `flat_d`, in forward batches of batch_size; xs and p on the model's device.
    Row s of xs is dataset sample offset + s (the index T sees). Raises InvalidInput on NaN/inf outputs."""
    dev = xs.device
    flat_d = flat_d.to(dev)
    ids_dev = sample_ids.to(dev)
    out = torch.empty(flat_d.shape[0], dtype=torch.float64, device=dev)
    for b0 in range(0, flat_d.shape[0], batch_size):
        b1 = min(flat_d.shape[0], b0 + batch_size)
        s_dev = ids_dev[b0:b1]
        xt = transform(xs.index_select(0, s_dev), flat_d[b0:b1], sample_ids[b0:b1] + offset)
        pt = model(xt).double().softmax(dim=1)
        out[b0:b1] = (pt - p.index_select(0, s_dev)).abs().amax(dim=1)
    res = out.cpu().numpy()
    if not np.isfinite(res).all():
        bad = sorted(set((sample_ids[~torch.from_numpy(np.isfinite(res))] + offset).tolist()))
        raise InvalidInput(f"NaN/inf model outputs on transformed samples {bad[0]}..{bad[-1]}")
    return res


@dataclass
class _Run:
    """What the sampling loops share: the model, the clean inputs and outputs, the arrays to fill."""

    model: nn.Module | Forward
    transform: SemanticTransform
    xs: Tensor  # (S, ...) on dev
    p_dev: Tensor  # (S, K) float64 on dev
    params: dict[str, Any]
    bs: int
    dev: torch.device
    z: np.ndarray  # (S, l, n)
    deltas: np.ndarray  # (S, l, n)
    draws: np.ndarray  # (S,)
    ctx: Any
    checkpoint_key: str
    checkpoint_every_s: float
    fingerprint: str
    last_save: float = 0.0
    offset: int = 0  # row k is dataset sample offset + k (a shard: core.shards)

    def z_of(self, sample_ids: Tensor, flat_d: Tensor) -> np.ndarray:
        """Z of the given (sample, delta) pairs (flat, CPU row ids), in forward batches of bs."""
        return transformed_z(self.model, self.transform, self.xs, self.p_dev, sample_ids, flat_d, self.bs,
                             self.offset)

    def after_group(self, g1: int) -> None:
        """Progress, cancel and the periodic checkpoint after samples [0, g1) are done."""
        if self.ctx is None:
            return
        S = self.z.shape[0]  # noqa: N806
        self.ctx.progress("certify", g1 / S, f"{g1}/{S} samples")
        now = time.perf_counter()
        cancel = self.ctx.should_cancel()
        if g1 < S and (cancel or now - self.last_save >= self.checkpoint_every_s):
            self.ctx.save_checkpoint(self.checkpoint_key, {
                "fingerprint": self.fingerprint, "done": g1, "z": torch.from_numpy(self.z[:g1].copy()),
                "draws": torch.from_numpy(self.draws[:g1].copy())})
            self.last_save = now
        if cancel:
            raise Cancelled("certification cancelled")

    def resume(self) -> int:
        """Samples already done by a checkpoint of the same run (0 if none)."""
        if self.ctx is None:
            return 0
        state = self.ctx.load_checkpoint(self.checkpoint_key)
        if state is None or state.get("fingerprint") != self.fingerprint:
            return 0
        done = int(state["done"])
        self.z[:done] = state["z"].numpy()
        self.draws[:done] = state["draws"].numpy() if "draws" in state else self.z.shape[1] * self.z.shape[2]
        return done


def _sample_full(run: _Run, seed: int, done: int) -> None:
    """Every sample gets all l n draws; groups of ceil(bs / (l n)) samples fill whole batches."""
    S, l, n = run.z.shape  # noqa: N806, E741
    group = max(1, math.ceil(run.bs / (l * n)))
    for g0 in range(done, S, group):
        g1 = min(S, g0 + group)
        dl = torch.stack([sample_deltas(seed, run.offset + i, l, n) for i in range(g0, g1)])  # (G, l, n)
        run.deltas[g0:g1] = dl.numpy()
        ids = torch.arange(g0, g1).repeat_interleave(l * n)
        run.z[g0:g1] = run.z_of(ids, dl.reshape(-1)).reshape(g1 - g0, l, n)
        run.draws[g0:g1] = l * n
        run.after_group(g1)


def _sample_early(run: _Run, seed: int, done: int, pred: np.ndarray, labels: np.ndarray,
                  d: np.ndarray) -> None:
    """Groups of ceil(bs / n) samples; each round gives every active sample its next repetition
    (n draws) in one batched pass, then drops the samples whose decision can no longer change."""
    S, l, n = run.z.shape  # noqa: N806, E741
    zf, df = run.z.reshape(S, l * n), run.deltas.reshape(S, l * n)
    prm = run.params
    kw = {"n": n, "l": l, "alpha": prm["alpha"], "epsilon": prm["epsilon"], "beta": prm["beta"]}

    def stopped(k: int) -> bool:
        fails = int(np.count_nonzero(zf[k, :run.draws[k]] >= d[k]))
        return stop_reason(prm["bound"], correct=bool(pred[k] == labels[k]), failures=fails, **kw) is not None

    group = max(1, math.ceil(run.bs / n))
    for g0 in range(done, S, group):
        g1 = min(S, g0 + group)
        full = {k: sample_deltas(seed, run.offset + k, l, n).reshape(-1) for k in range(g0, g1)}
        run.draws[g0:g1] = 0
        active = [k for k in range(g0, g1) if not stopped(k)]
        for pos in range(0, l * n, n):
            if not active:
                break
            flat = torch.cat([full[k][pos:pos + n] for k in active])
            zc = run.z_of(torch.tensor(active).repeat_interleave(n), flat).reshape(len(active), n)
            for a, k in enumerate(active):
                zf[k, pos:pos + n] = zc[a]
                df[k, pos:pos + n] = full[k][pos:pos + n].numpy()
                run.draws[k] = pos + n
            active = [k for k in active if not stopped(k)]
        run.after_group(g1)


def _checked_range(sample_range: tuple[int, int] | None, S: int) -> tuple[int, int]:  # noqa: N803
    """The rows a..b of a shard (default the whole run 0..S), checked to lie within 0..S."""
    a, b = (0, S) if sample_range is None else (int(sample_range[0]), int(sample_range[1]))
    if not 0 <= a < b <= S:
        raise InvalidInput(f"sample range {a}..{b} is not within the {S} samples to certify")
    return a, b


def _clean_rows(fwd: Forward, x: Tensor, a: int, b: int, S: int, bs: int, dev: torch.device  # noqa: N803
                ) -> tuple[Tensor, Tensor]:
    """(rows a..b of x on dev, their clean probabilities), computed in the whole run's batches over
    rows 0..S (the batches covering a..b), so each row's result does not depend on where a shard
    starts. The rows are read once (a streamed source decodes each certified image once)."""
    c0, c1 = a // bs * bs, min(S, -(-b // bs) * bs)
    xc = x[c0:c1].to(dev, torch.float32)
    return xc[a - c0:b - c0], clean_probabilities(fwd, xc, bs)[a - c0:b - c0]


def certify_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    transform: SemanticTransform,
    spec: Any,
    *,
    seed: int,
    device: str | None = None,
    ctx: Any = None,
    checkpoint_key: str = "certify",
    checkpoint_every_s: float = 30.0,
    sample_range: tuple[int, int] | None = None,
) -> CertificationResult:
    """Certify the first spec.samples of (x, y) (CertifySpec; module docstring). Row k of x is
    dataset sample k: k is its `index` (delta seed, precomputed variants).

    `sample_range` (a, b): only samples a..b-1 of those S (a shard, core.shards): the result holds
    their records and evidence rows, computed exactly as in the whole run (params.samples stays S;
    forward batches and sample groups keep the whole run's boundaries when `a` is a multiple of
    core.shards.shard_alignment), and core.shards.merge_results joins shards into the whole result.

    Forward passes are batched across samples (spec.batch_size inputs per pass, capped by
    core.datasets.forward_batch for large images); samples are
    processed in groups that fill whole batches (_sample_full, _sample_early). After a group, if
    checkpoint_every_s elapsed, z so far is checkpointed via ctx (resume skips the done groups,
    giving the same result); ctx.should_cancel() is checked between groups.
    The model is put in eval mode (and moved to `device` if given); the forwards run in the form
    core.fastforward.prepare_forward picks (channels_last, compiled for large runs) at
    spec.precision, recorded in the result's `forward`."""
    started = time.perf_counter()
    order = str(getattr(spec, "bound_order", "conservative"))
    if order not in BOUND_ORDERS:
        raise InvalidInput(f"bound order must be one of {BOUND_ORDERS}, got {order!r}")
    S = min(int(spec.samples), int(x.shape[0]))  # noqa: N806
    if S == 0:
        raise InvalidInput("no test samples to certify")
    n, l, bs = int(spec.n), int(spec.l), forward_batch(spec.batch_size, x.shape[1:])  # noqa: E741
    params = _params(spec, seed, S)
    a, b = _checked_range(sample_range, S)
    dev = torch.device(device) if device else _model_device(model)
    model.eval().to(dev)
    fwd = prepare_forward(model, tuple(x.shape[1:]), bs, device=dev, precision=params["precision"],
                          work=S * (1 + n * l))
    bs = fwd.batch  # the calibrated batch on large runs (core.calibrate); results do not depend on it
    xs, p_dev = _clean_rows(fwd, x, a, b, S, bs, dev)
    ys = y[a:b].detach().cpu().to(torch.int64)
    S = b - a  # noqa: N806 - from here on, the rows of this run
    if p_dev.shape[1] < 2:
        raise InvalidInput("certification needs a classifier with at least 2 classes")
    p_np = p_dev.cpu().numpy()
    if not np.isfinite(p_np).all():
        raise InvalidInput("the model produced NaN/inf outputs on the clean test samples")
    labels = ys.numpy()
    run = _Run(fwd, transform, xs, p_dev, params, bs, dev, z=np.full((S, l, n), np.nan),
               deltas=np.full((S, l, n), np.nan, dtype=np.float32), draws=np.zeros(S, dtype=np.int64),
               ctx=ctx, checkpoint_key=checkpoint_key, checkpoint_every_s=checkpoint_every_s,
               fingerprint=_fingerprint(params, xs, ys), last_save=time.perf_counter(), offset=a)
    done = run.resume()
    if params["early_stop"]:
        _sample_early(run, seed, done, p_np.argmax(axis=1), labels, margin(p_np))
    else:
        _sample_full(run, seed, done)
    for k in range(done):  # resumed: the skipped samples' deltas are regenerated (same seed)
        flat = sample_deltas(seed, a + k, l, n).numpy().reshape(-1)
        flat[int(run.draws[k]):] = np.nan
        run.deltas[k] = flat.reshape(l, n)
    indices = np.arange(a, b, dtype=np.int64)
    samples = [sample_record(int(indices[k]), int(labels[k]), p_np[k], run.z[k], params, order,
                             int(run.draws[k])) for k in range(S)]
    acc, pca = summarize(samples)
    return CertificationResult(
        samples=samples, z=run.z, accuracy=acc, pca=pca,
        failure_probability=result_failure_probability(params), params=params,
        bound_order=order, p=p_np, deltas=run.deltas, labels=labels, indices=indices,
        seconds=time.perf_counter() - started, draws=run.draws, forward_passes=S + int(run.draws.sum()),
        forward=fwd.describe(),
    )


# ----------------------------------------------------------------------------- certificate files
def describe_model(model: nn.Module, arch: str, sha256: str | None, masks: Any = None) -> dict[str, Any]:
    """The certificate's "model" entry: arch, weights sha256 and the sparsity of the prunable
    weights (core.masking.sparsity_report: params / nonzero / sparsity over conv + linear weights)."""
    rep = sparsity_report(model, masks)
    return {
        "arch": arch, "sha256": sha256, "params": int(rep["params"]), "nonzero": int(rep["nonzero"]),
        "sparsity": float(rep["sparsity"]),
        "layers": [{"name": e["name"], "sparsity": float(e["sparsity"])} for e in rep["layers"]],
    }


def evidence_sha256(z: np.ndarray, deltas: np.ndarray, p: np.ndarray, labels: np.ndarray,
                    indices: np.ndarray, draws: np.ndarray | None = None) -> str:
    """Hash of the evidence arrays' contents (canonical dtypes, C order); `draws` (S,) is part of it
    when given (evidence written before early stopping has none)."""
    h = hashlib.sha256()
    arrays = [(z, np.float64), (deltas, np.float32), (p, np.float64), (labels, np.int64), (indices, np.int64)]
    if draws is not None:
        arrays.append((draws, np.int64))
    for a, dt in arrays:
        arr = np.ascontiguousarray(np.asarray(a, dtype=dt))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def guarantee(params: dict[str, Any]) -> dict[str, Any]:
    """The certificate's "guarantee": the bound's name, its statement and assumptions in words."""
    bound = params.get("bound", "cccert")
    return {"bound": bound, **GUARANTEES[bound]}


def software(forward: dict[str, Any] | None = None) -> dict[str, Any]:
    """The certificate's "software": carcert and torch versions, and what ran the forwards
    (core.fastforward.Forward.describe(): form, precision, device, batch, compile fallback) when known."""
    out: dict[str, Any] = {"carcert": core.__version__, "torch": torch.__version__.split("+")[0]}
    if forward:
        out["forward"] = dict(forward)
    return out


def build_certificate(
    result: CertificationResult,
    *,
    model_info: dict[str, Any],
    mask_sha256: str | None,
    dataset: dict[str, Any],
    transform: dict[str, Any],
    job_id: str | None = None,
) -> dict[str, Any]:
    """The DESIGN.md certificate (plus "bound_order", "guarantee", "forward_passes" and
    "evidence_sha256"). Everything but created_at and job_id (certificate_body) is a function of the
    inputs and the seed."""
    return {
        "job_id": job_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software(result.forward),
        "model": model_info,
        "mask_sha256": mask_sha256,
        "dataset": dataset,
        "transform": transform,
        "params": dict(result.params),
        "bound_order": result.bound_order,
        "guarantee": guarantee(result.params),
        "failure_probability": result.failure_probability,
        "accuracy": result.accuracy,
        "pca": result.pca,
        "forward_passes": int(result.forward_passes),
        "samples": result.samples,
        "evidence_sha256": evidence_sha256(result.z, result.deltas, result.p, result.labels, result.indices,
                                           result.draws),
    }


def certificate_body(cert: dict[str, Any]) -> str:
    """Canonical JSON of the certificate without created_at / job_id (equal runs -> equal text)."""
    return json.dumps({k: v for k, v in cert.items() if k not in ("created_at", "job_id")}, sort_keys=True)


def evidence_path_for(cert_path: Path) -> Path:
    """certificate.json -> evidence.npz; other names: <stem>.evidence.npz beside the certificate."""
    cert_path = Path(cert_path)
    if cert_path.name == "certificate.json":
        return cert_path.with_name("evidence.npz")
    return cert_path.with_name(f"{cert_path.stem}.evidence.npz")


def write_certificate(
    cert: dict[str, Any], result: CertificationResult, out_dir: Path, *, name: str = "certificate.json"
) -> tuple[Path, Path]:
    """Write <out_dir>/<name> (sorted keys) and its evidence npz (evidence_path_for)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / name
    ev_path = evidence_path_for(cert_path)
    tmp = ev_path.with_name(ev_path.name + ".tmp.npz")
    np.savez_compressed(tmp, z=result.z, deltas=result.deltas, p=result.p, labels=result.labels,
                        indices=result.indices, draws=result.draws)
    tmp.replace(ev_path)
    write_json(cert_path, cert)
    return cert_path, ev_path


def load_evidence(ev_path: Path) -> dict[str, np.ndarray]:
    """The evidence arrays (z, deltas, p, labels, indices and, when present, draws); never unpickles."""
    try:
        with np.load(ev_path, allow_pickle=False) as ev:
            out = {k: ev[k] for k in ("z", "deltas", "p", "labels", "indices")}
            if "draws" in ev.files:
                out["draws"] = ev["draws"]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInput(f"cannot read evidence {ev_path}: {exc}") from exc
    return out


def _verify_sample(k: int, rec: dict[str, Any], ev: dict[str, np.ndarray], m: int, params: dict[str, Any],
                   order: str) -> tuple[dict[str, Any], list[str]]:
    """The recomputed record of sample k (m draws) and the mismatches it shows."""
    n, l = params["n"], params["l"]  # noqa: E741
    bad = []
    want_d = sample_deltas(params["seed"], int(ev["indices"][k]), l, n).numpy().reshape(-1)
    got_d, got_z = ev["deltas"][k].reshape(-1), ev["z"][k].reshape(-1)
    if not np.array_equal(got_d[:m], want_d[:m]):
        bad.append(f"sample {k}: deltas are not those of seed {params['seed']}")
    if m < n * l and not (np.isnan(got_d[m:]).all() and np.isnan(got_z[m:]).all()):
        bad.append(f"sample {k}: entries after its {m} draws are not empty (NaN)")
    if np.isnan(got_z[:m]).any():
        bad.append(f"sample {k}: NaN among its {m} sampled Z")
    idx, label = int(ev["indices"][k]), int(ev["labels"][k])
    want = sample_record(idx, label, ev["p"][k], ev["z"][k], params, order, m)
    if m < n * l:
        reason = stop_reason(params["bound"], correct=want["pred"] == label, failures=want["failures"], n=n,
                             l=l, alpha=params["alpha"], epsilon=params["epsilon"], beta=params["beta"])
        if not params["early_stop"] or reason is None:
            bad.append(f"sample {k}: stopped after {m} of {n * l} draws without a valid stopping reason")
    for key, value in want.items():
        if rec.get(key) != value:
            bad.append(f"sample {k}: {key} {rec.get(key)!r} != recomputed {value!r}")
    if any(key not in want for key in rec):
        bad.append(f"sample {k}: unexpected fields {sorted(set(rec) - set(want))}")
    return want, bad


def verify_certificate(cert_path: Path, evidence_path: Path | None = None) -> list[str]:
    """Recompute every number of the certificate from its evidence; [] when all agree bit for bit,
    else one message per mismatch. The certificate must carry evidence_sha256, and the evidence must
    hash to it. Samples stopped early are checked too: their sampled deltas are the seed's, the rest
    is empty, and the stopping condition (core.bounds.stop_reason) holds on what was sampled."""
    cert_path = Path(cert_path)
    try:
        cert = json.loads(cert_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read certificate {cert_path}: {exc}") from exc
    ev = load_evidence(Path(evidence_path) if evidence_path else evidence_path_for(cert_path))
    try:
        params = {k: cert["params"][k] for k in PARAM_KEYS}
        params.update({k: cert["params"].get(k, v) for k, v in OPTIONAL_PARAMS.items()})
        order = cert.get("bound_order", "conservative")
        samples = cert["samples"]
        claimed_hash = cert["evidence_sha256"]
    except (KeyError, TypeError) as exc:
        return [f"certificate lacks a required field: {exc}"]
    if order not in BOUND_ORDERS or params["bound"] not in GUARANTEES:
        return [f"unknown bound_order {order!r} or bound {params['bound']!r}"]
    S, l, n = len(samples), params["l"], params["n"]  # noqa: N806, E741
    draws = ev.get("draws", np.full(S, n * l, dtype=np.int64))
    if (ev["z"].shape != (S, l, n) or ev["deltas"].shape != (S, l, n) or ev["p"].shape[0] != S
            or ev["labels"].shape != (S,) or draws.shape != (S,)):
        return [f"evidence shapes z {ev['z'].shape}, deltas {ev['deltas'].shape}, p {ev['p'].shape}, draws "
                f"{draws.shape} do not match {S} samples x l={l} x n={n}"]
    bad: list[str] = []
    if params["samples"] != S:
        bad.append(f"params.samples {params['samples']} != {S} sample records")
    h = evidence_sha256(ev["z"], ev["deltas"], ev["p"], ev["labels"], ev["indices"], ev.get("draws"))
    if claimed_hash != h:
        bad.append(f"evidence_sha256 {claimed_hash} != recomputed {h}")
    fp = result_failure_probability(params)
    if cert.get("failure_probability") != fp:
        bad.append(f"failure_probability {cert.get('failure_probability')!r} != recomputed {fp!r}")
    named = (cert.get("guarantee") or {}).get("bound", params["bound"])
    if named != params["bound"]:
        bad.append(f"guarantee names bound {named!r} but params.bound is {params['bound']!r}")
    passes = S + int(draws.sum())
    if "forward_passes" in cert and cert["forward_passes"] != passes:
        bad.append(f"forward_passes {cert['forward_passes']!r} != recomputed {passes}")
    recomputed = []
    for k, rec in enumerate(samples):
        m = int(draws[k])
        if not 0 <= m <= n * l:
            bad.append(f"sample {k}: {m} draws outside [0, {n * l}]")
            continue
        want, msgs = _verify_sample(k, rec, ev, m, params, order)
        recomputed.append(want)
        bad.extend(msgs)
    acc, pca = summarize(recomputed)
    if cert.get("accuracy") != acc:
        bad.append(f"accuracy {cert.get('accuracy')!r} != recomputed {acc!r}")
    if cert.get("pca") != pca:
        bad.append(f"pca {cert.get('pca')!r} != recomputed {pca!r}")
    return bad


__all__ = ["BOUND_ORDERS", "CertificationResult", "build_certificate", "certificate_body", "certify_model",
           "describe_model", "guarantee", "load_evidence", "result_failure_probability", "transformed_z",
           "epsilon_bound", "evidence_path_for", "failure_probability", "log_y", "margin", "sample_deltas",
           "t_grid", "verify_certificate", "write_certificate"]
