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

Deltas of sample `index` come from a torch.Generator seeded from (seed, index) (numpy SeedSequence),
drawn as an (l, n) float32 array, so results depend neither on batching nor on resuming.
The evidence file (npz) holds z (S, l, n), deltas (S, l, n), p (S, K), labels, indices; from it
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
from core.context import write_json
from core.errors import Cancelled, InvalidInput
from core.masking import sparsity_report
from core.transforms import SemanticTransform

BOUND_ORDERS = ("conservative", "reference")
PARAM_KEYS = ("n", "l", "alpha", "epsilon", "t_min", "t_max", "t_steps", "seed", "samples")


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
                  order: str) -> dict[str, Any]:
    """The certificate entry of one sample, from its p (K,) and z (l, n)."""
    d = float(margin(p))
    pred = int(np.argmax(p))
    t = t_grid(params["t_min"], params["t_max"], params["t_steps"])
    eps, t_star = epsilon_bound(z, d, params["alpha"], t, order)
    return {
        "index": int(index),
        "label": int(label),
        "pred": pred,
        "d": d,
        "max_z": float(np.max(z)),
        "epsilon_bound": eps,
        "t_star": t_star,
        "certified": bool(pred == int(label) and eps <= params["epsilon"]),
    }


def summarize(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """(accuracy, PCA of Eq. 10) over the certified samples' records."""
    s = max(1, len(samples))
    return (sum(r["pred"] == r["label"] for r in samples) / s, sum(r["certified"] for r in samples) / s)


# ----------------------------------------------------------------------------- the run
@dataclass
class CertificationResult:
    samples: list[dict[str, Any]]
    z: np.ndarray  # (S, l, n) float64
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


def _params(spec: Any, seed: int, samples: int) -> dict[str, Any]:
    return {
        "n": int(spec.n), "l": int(spec.l), "alpha": float(spec.alpha), "epsilon": float(spec.epsilon),
        "t_min": float(spec.t_min), "t_max": float(spec.t_max), "t_steps": int(spec.t_steps),
        "seed": int(seed), "samples": int(samples),
    }


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
def clean_probabilities(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """p = softmax(f(x)) in float64, (N, K) on the model's device."""
    out = [model(x[i:i + batch_size]).double().softmax(dim=1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def _group_z(model: nn.Module, transform: SemanticTransform, xs: Tensor, p_dev: Tensor, dl: Tensor,
             g0: int, bs: int) -> np.ndarray:
    """Z of the samples g0, g0 + 1, ... under their deltas dl (G, l, n): max over classes of
    |p(T(x, delta)) - p(x)|, forward passes of `bs` transformed inputs across samples."""
    g, l, n = dl.shape  # noqa: E741
    dev = p_dev.device
    flat_d = dl.reshape(-1).to(dev)
    flat_s = torch.arange(g0, g0 + g).repeat_interleave(l * n)  # sample of each flat position (CPU)
    flat_s_dev = flat_s.to(dev)
    zg = torch.empty(flat_d.shape[0], dtype=torch.float64, device=dev)
    for b0 in range(0, flat_d.shape[0], bs):
        b1 = min(flat_d.shape[0], b0 + bs)
        s_dev = flat_s_dev[b0:b1]
        xt = transform(xs.index_select(0, s_dev), flat_d[b0:b1], flat_s[b0:b1])
        pt = model(xt).double().softmax(dim=1)
        zg[b0:b1] = (pt - p_dev.index_select(0, s_dev)).abs().amax(dim=1)
    return zg.cpu().numpy().reshape(g, l, n)


def _resume(ctx: Any, key: str, fingerprint: str, z: np.ndarray) -> int:
    """Samples already certified by an earlier run of the same certification (their Z copied into
    z); 0 without a matching checkpoint."""
    if ctx is None:
        return 0
    state = ctx.load_checkpoint(key)
    if state is None or state.get("fingerprint") != fingerprint:
        return 0
    done = int(state["done"])
    z[:done] = state["z"].numpy()
    return done


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
) -> CertificationResult:
    """Certify the first spec.samples of (x, y) (CertifySpec; module docstring). Row k of x is
    dataset sample k: k is its `index` (delta seed, precomputed variants).

    Forward passes are batched across samples (spec.batch_size inputs per pass); samples are
    processed in groups of ceil(batch_size / (l n)) so that a group fills whole batches. After a
    group, if checkpoint_every_s elapsed, z so far is checkpointed via ctx (resume skips the done
    groups, giving the same result); ctx.should_cancel() is checked between groups.
    The model is put in eval mode (and moved to `device` if given)."""
    started = time.perf_counter()
    order = str(getattr(spec, "bound_order", "conservative"))
    if order not in BOUND_ORDERS:
        raise InvalidInput(f"bound order must be one of {BOUND_ORDERS}, got {order!r}")
    S = min(int(spec.samples), int(x.shape[0]))  # noqa: N806
    if S == 0:
        raise InvalidInput("no test samples to certify")
    n, l, bs = int(spec.n), int(spec.l), int(spec.batch_size)  # noqa: E741
    params = _params(spec, seed, S)
    dev = torch.device(device) if device else _model_device(model)
    model.eval().to(dev)
    xs = x[:S].to(dev, torch.float32)
    ys = y[:S].detach().cpu().to(torch.int64)

    p_dev = clean_probabilities(model, xs, bs)  # (S, K)
    if p_dev.shape[1] < 2:
        raise InvalidInput("certification needs a classifier with at least 2 classes")
    p_np = p_dev.cpu().numpy()
    if not np.isfinite(p_np).all():
        raise InvalidInput("the model produced NaN/inf outputs on the clean test samples")

    z = np.zeros((S, l, n), dtype=np.float64)
    deltas = np.zeros((S, l, n), dtype=np.float32)
    fp = _fingerprint(params, xs, ys)
    done = _resume(ctx, checkpoint_key, fp, z)
    group = max(1, math.ceil(bs / (l * n)))
    last_save = time.perf_counter()

    with torch.inference_mode():
        for g0 in range(done, S, group):
            g1 = min(S, g0 + group)
            dl = torch.stack([sample_deltas(seed, i, l, n) for i in range(g0, g1)])  # (G, l, n)
            deltas[g0:g1] = dl.numpy()
            z[g0:g1] = _group_z(model, transform, xs, p_dev, dl, g0, bs)
            if not np.isfinite(z[g0:g1]).all():
                raise InvalidInput(f"NaN/inf model outputs on transformed samples {g0}..{g1 - 1}")
            if ctx is not None:
                ctx.progress("certify", g1 / S, f"{g1}/{S} samples")
                now = time.perf_counter()
                cancel = ctx.should_cancel()
                if g1 < S and (cancel or now - last_save >= checkpoint_every_s):
                    ctx.save_checkpoint(checkpoint_key, {"fingerprint": fp, "done": g1,
                                                         "z": torch.from_numpy(z[:g1].copy())})
                    last_save = now
                if cancel:
                    raise Cancelled("certification cancelled")

    if deltas[:done].size:  # resumed: the skipped samples' deltas are regenerated (same seed)
        deltas[:done] = torch.stack([sample_deltas(seed, i, l, n) for i in range(done)]).numpy()
    labels = ys.numpy()
    indices = np.arange(S, dtype=np.int64)
    samples = [sample_record(int(indices[k]), int(labels[k]), p_np[k], z[k], params, order) for k in range(S)]
    acc, pca = summarize(samples)
    return CertificationResult(
        samples=samples, z=z, accuracy=acc, pca=pca,
        failure_probability=failure_probability(n, l, float(spec.alpha)), params=params,
        bound_order=order, p=p_np, deltas=deltas, labels=labels, indices=indices,
        seconds=time.perf_counter() - started,
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
                    indices: np.ndarray) -> str:
    """Hash of the evidence arrays' contents (canonical dtypes, C order)."""
    h = hashlib.sha256()
    for a, dt in ((z, np.float64), (deltas, np.float32), (p, np.float64), (labels, np.int64),
                  (indices, np.int64)):
        arr = np.ascontiguousarray(np.asarray(a, dtype=dt))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def build_certificate(
    result: CertificationResult,
    *,
    model_info: dict[str, Any],
    mask_sha256: str | None,
    dataset: dict[str, Any],
    transform: dict[str, Any],
    job_id: str | None = None,
) -> dict[str, Any]:
    """The DESIGN.md certificate (plus "bound_order" and "evidence_sha256")."""
    return {
        "job_id": job_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": {"carcert": core.__version__, "torch": torch.__version__.split("+")[0]},
        "model": model_info,
        "mask_sha256": mask_sha256,
        "dataset": dataset,
        "transform": transform,
        "params": dict(result.params),
        "bound_order": result.bound_order,
        "failure_probability": result.failure_probability,
        "accuracy": result.accuracy,
        "pca": result.pca,
        "samples": result.samples,
        "evidence_sha256": evidence_sha256(result.z, result.deltas, result.p, result.labels, result.indices),
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
                        indices=result.indices)
    tmp.replace(ev_path)
    write_json(cert_path, cert)
    return cert_path, ev_path


def verify_certificate(cert_path: Path, evidence_path: Path | None = None) -> list[str]:
    """Recompute every number of the certificate from its evidence; [] when all agree bit for bit,
    else one message per mismatch."""
    cert_path = Path(cert_path)
    try:
        cert = json.loads(cert_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read certificate {cert_path}: {exc}") from exc
    ev_path = Path(evidence_path) if evidence_path else evidence_path_for(cert_path)
    try:
        with np.load(ev_path, allow_pickle=False) as ev:
            z, deltas, p = ev["z"], ev["deltas"], ev["p"]
            labels, indices = ev["labels"], ev["indices"]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInput(f"cannot read evidence {ev_path}: {exc}") from exc

    bad: list[str] = []
    try:
        params = {k: cert["params"][k] for k in PARAM_KEYS}
        order = cert.get("bound_order", "conservative")
        samples = cert["samples"]
    except (KeyError, TypeError) as exc:
        return [f"certificate lacks a required field: {exc}"]
    if order not in BOUND_ORDERS:
        return [f"unknown bound_order {order!r}"]
    S, l, n = len(samples), params["l"], params["n"]  # noqa: N806, E741
    if z.shape != (S, l, n) or deltas.shape != (S, l, n) or p.shape[0] != S or labels.shape != (S,):
        return [f"evidence shapes z {z.shape}, deltas {deltas.shape}, p {p.shape} do not match "
                f"{S} samples x l={l} x n={n}"]
    if params["samples"] != S:
        bad.append(f"params.samples {params['samples']} != {S} sample records")
    h = evidence_sha256(z, deltas, p, labels, indices)
    if "evidence_sha256" in cert and cert["evidence_sha256"] != h:
        bad.append(f"evidence_sha256 {cert['evidence_sha256']} != recomputed {h}")
    fp = failure_probability(n, l, params["alpha"])
    if cert.get("failure_probability") != fp:
        bad.append(f"failure_probability {cert.get('failure_probability')!r} != recomputed {fp!r}")
    recomputed = []
    for k, rec in enumerate(samples):
        if not np.array_equal(deltas[k], sample_deltas(params["seed"], int(indices[k]), l, n).numpy()):
            bad.append(f"sample {k}: deltas are not those of seed {params['seed']}")
        want = sample_record(int(indices[k]), int(labels[k]), p[k], z[k], params, order)
        recomputed.append(want)
        for key, value in want.items():
            if rec.get(key) != value:
                bad.append(f"sample {k}: {key} {rec.get(key)!r} != recomputed {value!r}")
        if any(key not in want for key in rec):
            bad.append(f"sample {k}: unexpected fields {sorted(set(rec) - set(want))}")
    acc, pca = summarize(recomputed)
    if cert.get("accuracy") != acc:
        bad.append(f"accuracy {cert.get('accuracy')!r} != recomputed {acc!r}")
    if cert.get("pca") != pca:
        bad.append(f"pca {cert.get('pca')!r} != recomputed {pca!r}")
    return bad


__all__ = ["BOUND_ORDERS", "CertificationResult", "build_certificate", "certificate_body", "certify_model",
           "describe_model",
           "epsilon_bound", "evidence_path_for", "failure_probability", "log_y", "margin", "sample_deltas",
           "t_grid", "verify_certificate", "write_certificate"]
