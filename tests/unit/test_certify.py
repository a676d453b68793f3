"""core.certify against independent computations: Eq. 13-14 in mpmath, brute-force failure
probabilities, the label-invariance lemma (Appendix A.2), tamper detection, determinism, resume."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core.certify import (
    build_certificate,
    certificate_body,
    certify_model,
    epsilon_bound,
    failure_probability,
    log_y,
    margin,
    t_grid,
    verify_certificate,
    write_certificate,
)
from core.context import LocalContext
from core.errors import Cancelled
from core.spec import CertifySpec
from core.transforms import SemanticTransform

mpmath.mp.dps = 40


# ----------------------------------------------------------------------------- Eq. 13-14 reference
def ref_bound(z: np.ndarray, d: float, alpha: float, ts: list[float], order: str) -> tuple[mpmath.mpf, int]:
    """Eq. 13 written out: Y_j(t) = (1/n) sum_i exp(t Z_i) / exp(t d), in 40-digit arithmetic."""
    n = z.shape[1]
    ys = [[mpmath.fsum(mpmath.exp(mpmath.mpf(t) * mpmath.mpf(float(v))) for v in row)
           / (n * mpmath.exp(mpmath.mpf(t) * mpmath.mpf(d))) for t in ts] for row in z]
    if order == "conservative":
        per_t = [max(ys[j][k] for j in range(len(ys))) for k in range(len(ts))]
        k = min(range(len(ts)), key=lambda i: per_t[i])
        val = per_t[k]
    else:
        best = [min(range(len(ts)), key=lambda i, j=j: ys[j][i]) for j in range(len(ys))]
        j = max(range(len(ys)), key=lambda jj: ys[jj][best[jj]])
        k, val = best[j], ys[j][best[j]]
    return min(mpmath.mpf(1), val / alpha), k


def _grid(t_min: float, t_max: float, steps: int) -> list[float]:
    return [10 ** (math.log10(t_min) + (math.log10(t_max) - math.log10(t_min)) * k / (steps - 1))
            for k in range(steps)]


def test_t_grid_is_log_spaced() -> None:
    np.testing.assert_allclose(t_grid(1e-4, 1e4, 500), _grid(1e-4, 1e4, 500), rtol=1e-12)
    assert t_grid(1e-4, 1e4, 500)[0] == 1e-4 and t_grid(1e-4, 1e4, 500)[-1] == pytest.approx(1e4, rel=1e-14)
    assert t_grid(2.0, 3.0, 1).tolist() == [2.0]


CASES = {
    "all_below": (np.random.default_rng(0).uniform(0.0, 0.05, (4, 30)), 0.2),
    "some_above": (np.random.default_rng(1).uniform(0.0, 0.3, (4, 30)), 0.1),
    "rare_above": (np.where(np.random.default_rng(2).random((4, 30)) < 0.05, 0.4, 0.01), 0.15),
    "d_zero": (np.random.default_rng(3).uniform(0.0, 0.2, (3, 20)), 0.0),
    "z_one": (np.ones((2, 10)), 0.3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("order", ["conservative", "reference"])
@pytest.mark.parametrize("t_max", [50.0, 1e4])
def test_bound_matches_mpmath(case: str, order: str, t_max: float) -> None:
    z, d = CASES[case]
    ts = _grid(1e-4, t_max, 40)
    eps, t_star = epsilon_bound(z, d, 0.9, np.array(ts), order)
    ref, k = ref_bound(z, d, 0.9, ts, order)
    assert math.isfinite(eps) and 0.0 <= eps <= 1.0
    if ref < mpmath.mpf("1e-290"):
        assert eps < 1e-280
    else:
        assert eps == pytest.approx(float(ref), rel=1e-9)
    if ref < 1:
        assert t_star == pytest.approx(ts[k], rel=1e-12)
    if case == "d_zero":
        assert eps == 1.0  # Y >= 1 > alpha whenever d = 0
    if case == "all_below" and t_max == 1e4:
        assert eps < 1e-100


def test_log_y_no_overflow_at_large_t() -> None:
    z = np.array([[1.0, 0.5, 0.0, 1.0]])
    ts = np.array([1e-4, 1.0, 1e4])
    ly = log_y(z, 0.25, ts)
    assert np.isfinite(ly).all()
    for k, t in enumerate(ts):
        want = mpmath.log(mpmath.fsum(mpmath.exp(t * v) for v in z[0]) / 4) - t * 0.25
        assert ly[0, k] == pytest.approx(float(want), rel=1e-12, abs=1e-12)


@given(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6), st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None)
def test_reference_order_never_above_conservative(zs: list[float], d: float) -> None:
    z = np.array(zs).reshape(2, 3)
    t = t_grid(1e-4, 1e4, 50)
    assert epsilon_bound(z, d, 0.9, t, "reference")[0] <= epsilon_bound(z, d, 0.9, t, "conservative")[0]


def test_failure_probability_eq14() -> None:
    assert failure_probability(100, 10, 0.9) == pytest.approx(0.5**10, rel=1e-12)
    assert failure_probability(50, 3, 0.8) == pytest.approx((1 / (1 + 50 * 0.04)) ** 3, rel=1e-12)


# ----------------------------------------------------------------------------- label invariance
@given(st.lists(st.floats(-6, 6), min_size=2, max_size=8), st.data())
@settings(max_examples=300, deadline=None)
def test_label_invariance_lemma(logits: list[float], data: st.DataObject) -> None:
    """Appendix A.2: ||p - p_T||_inf < d(p) implies argmax p_T = argmax p."""
    k = len(logits)
    noise = data.draw(st.lists(st.floats(-1, 1), min_size=k, max_size=k))
    scale = data.draw(st.floats(0.0, 3.0))
    lo = np.array(logits)
    p = np.exp(lo - lo.max())
    p /= p.sum()
    q = np.exp(lo + scale * np.array(noise) - (lo + scale * np.array(noise)).max())
    q /= q.sum()
    d = float(margin(p))
    assert d == pytest.approx((np.sort(p)[-1] - np.sort(p)[-2]) / 2)
    if np.abs(p - q).max() < d:
        assert np.argmax(q) == np.argmax(p)


def test_label_invariance_needs_the_half() -> None:
    # the margin without the factor 1/2 would not suffice: Z < 2d but the label flips
    p, q = np.array([0.6, 0.4]), np.array([0.45, 0.55])
    assert np.abs(p - q).max() < 2 * margin(p) and np.abs(p - q).max() >= margin(p)
    assert np.argmax(p) != np.argmax(q)


# ----------------------------------------------------------------------------- soundness
SCALE = 10.0
SHIFT = np.array([-0.3, 0.3, 0.0])


class LogitShift(SemanticTransform):
    """T(x, delta) = x + delta * c: with the model below the logits move by SCALE * delta * c."""

    def __call__(self, x, delta, index=None):
        c = torch.tensor(SHIFT, dtype=x.dtype).view(1, 3, 1, 1)
        return x + torch.as_tensor(delta, dtype=x.dtype).view(-1, 1, 1, 1) * c

    def describe(self):
        return {"kind": "test", "name": "logit-shift"}


def _linear_model() -> nn.Module:
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(SCALE * torch.eye(3))
    return nn.Sequential(nn.Flatten(), lin)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _true_failure(x: np.ndarray, draws: int = 200_000) -> float:
    """P_{delta ~ U[0,1]}(Z >= d), by brute force in numpy float64."""
    delta = np.random.default_rng(123).random(draws)
    p = _softmax(SCALE * x)
    pt = _softmax(SCALE * (x[None, :] + delta[:, None] * SHIFT[None, :]))
    z = np.abs(pt - p[None, :]).max(axis=1)
    srt = np.sort(p)
    return float(np.mean(z >= (srt[-1] - srt[-2]) / 2))


def _soundness_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # spans true failure probabilities 0.9 .. 0, densely around the threshold a ~ 1.1
    near = [1.06, 1.08, 1.09, 1.095, 1.099, 1.1, 1.101]
    a = np.concatenate([np.linspace(0.55, 1.6, 14), near, [0.5, 0.9]])
    x = np.stack([a, np.full_like(a, 0.5), np.full_like(a, 0.2)], axis=1)
    y = np.zeros(len(a), dtype=np.int64)
    y[-2] = 1  # a = 0.5 ties with class 1: whatever is predicted, label 1 here
    y[-1] = 2  # a wrong label: never certified
    return torch.tensor(x, dtype=torch.float32).view(-1, 3, 1, 1), torch.tensor(y)


def test_soundness_against_brute_force() -> None:
    x, y = _soundness_inputs()
    spec = CertifySpec(n=100, l=10, samples=len(y), batch_size=1000)
    res = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=7)
    truth = [_true_failure(x[k].view(-1).double().numpy()) for k in range(len(y))]
    certified = [r["certified"] for r in res.samples]
    for r, tp in zip(res.samples, truth, strict=True):
        if r["certified"]:
            assert tp <= spec.epsilon, (r, tp)
            assert r["pred"] == r["label"]
        if tp >= 0.05:
            assert not r["certified"] and r["epsilon_bound"] >= 0.05 * 0.9
    # the test is not vacuous: both outcomes occur among correctly classified samples
    assert any(certified) and any(tp >= 0.05 for tp in truth[:-2])
    assert any(spec.epsilon < tp < 0.05 for tp in truth) and any(0 < tp <= spec.epsilon for tp in truth)
    assert not certified[-1]
    # accuracy / PCA from their definitions
    preds = _softmax(SCALE * x.view(-1, 3).double().numpy()).argmax(1)
    assert res.accuracy == pytest.approx(np.mean(preds == y.numpy()))
    assert res.pca == pytest.approx(np.mean(certified))
    assert res.failure_probability == pytest.approx(0.5**10)
    # Z in the result equals an independent numpy evaluation at the recorded deltas
    k = 3
    xk = SCALE * x[k].view(-1).double().numpy()
    pt = _softmax(xk[None, :] + SCALE * res.deltas[k].reshape(-1, 1).astype(np.float64) * SHIFT[None, :])
    np.testing.assert_allclose(res.z[k].reshape(-1), np.abs(pt - _softmax(xk)).max(1), atol=1e-6)


# ----------------------------------------------------------------------------- files, verify, determinism
def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(6, 3, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 4
    return model, x, y


class Brighten(SemanticTransform):
    def __call__(self, x, delta, index=None):
        return (x + 0.2 * torch.as_tensor(delta, dtype=x.dtype).view(-1, 1, 1, 1)).clamp(0, 1)

    def describe(self):
        return {"kind": "test", "name": "brighten"}


def _run(spec: CertifySpec, seed: int = 3, **kw):
    model, x, y = _tiny()
    return certify_model(model, x, y, Brighten(), spec, seed=seed, **kw)


def _cert(res):
    return build_certificate(res, model_info={"arch": "tiny"}, mask_sha256=None,
                             dataset={"ref": "synthetic", "sha256": "0"}, transform={"name": "brighten"})


SPEC = CertifySpec(n=20, l=3, samples=6, batch_size=25, epsilon=0.05, t_steps=60)


def test_verify_passes_and_detects_tampering(tmp_path) -> None:
    res = _run(SPEC)
    cert = _cert(res)
    cp, ep = write_certificate(cert, res, tmp_path)
    assert (cp.name, ep.name) == ("certificate.json", "evidence.npz")
    assert verify_certificate(cp) == []
    # a changed epsilon_bound
    bad = json.loads(cp.read_text())
    bad["samples"][2]["epsilon_bound"] = bad["samples"][2]["epsilon_bound"] * 0.5 + 1e-9
    (tmp_path / "t1.json").write_text(json.dumps(bad))
    msgs = verify_certificate(tmp_path / "t1.json", ep)
    assert len(msgs) == 1 and "sample 2: epsilon_bound" in msgs[0]
    # a changed certified flag and pca: both reported
    bad = json.loads(cp.read_text())
    bad["samples"][1]["certified"] = not bad["samples"][1]["certified"]
    bad["pca"] = 0.123
    (tmp_path / "t2.json").write_text(json.dumps(bad))
    msgs = verify_certificate(tmp_path / "t2.json", ep)
    assert any("sample 1: certified" in m for m in msgs) and any(m.startswith("pca") for m in msgs)
    # one changed Z in the evidence
    with np.load(ep) as ev:
        arrays = {k: ev[k].copy() for k in ev.files}
    j = np.unravel_index(np.argmax(arrays["z"][4]), arrays["z"][4].shape)
    arrays["z"][4][j] += 0.3
    np.savez(tmp_path / "tampered.npz", **arrays)
    msgs = verify_certificate(cp, tmp_path / "tampered.npz")
    assert any("evidence_sha256" in m for m in msgs)
    assert any(m.startswith("sample 4: max_z") for m in msgs)
    assert any(m.startswith("sample 4: epsilon_bound") for m in msgs)


def test_result_matches_recomputation_and_orders(tmp_path) -> None:
    res = _run(SPEC)
    t = t_grid(SPEC.t_min, SPEC.t_max, SPEC.t_steps)
    for k, r in enumerate(res.samples):
        assert r["d"] == margin(res.p[k])
        assert r["max_z"] == res.z[k].max()
        assert (r["epsilon_bound"], r["t_star"]) == epsilon_bound(res.z[k], r["d"], SPEC.alpha, t)
        assert r["certified"] == (r["pred"] == r["label"] and r["epsilon_bound"] <= SPEC.epsilon)
    assert not res.samples[0]["certified"]  # wrong label by construction
    ref = _run(SPEC.model_copy(update={"bound_order": "reference"}))
    np.testing.assert_array_equal(ref.z, res.z)
    for a, b in zip(ref.samples, res.samples, strict=True):
        assert a["epsilon_bound"] <= b["epsilon_bound"]
    cert = _cert(ref)
    assert cert["bound_order"] == "reference"
    cp, _ = write_certificate(cert, ref, tmp_path, name="ref.json")
    assert (tmp_path / "ref.evidence.npz").exists()
    assert verify_certificate(cp) == []


def test_deterministic_and_batch_independent(tmp_path) -> None:
    a, b = _run(SPEC), _run(SPEC)
    ca, cb = _cert(a), _cert(b)
    assert certificate_body(ca) == certificate_body(cb)
    write_certificate(ca, a, tmp_path / "a")
    write_certificate(cb, b, tmp_path / "b")
    ja = json.loads((tmp_path / "a" / "certificate.json").read_text())
    jb = json.loads((tmp_path / "b" / "certificate.json").read_text())
    for j in (ja, jb):
        j.pop("created_at")
        j.pop("job_id")
    assert json.dumps(ja, sort_keys=True) == json.dumps(jb, sort_keys=True)
    other = _run(SPEC.model_copy(update={"batch_size": 7}))
    np.testing.assert_array_equal(other.deltas, a.deltas)
    np.testing.assert_allclose(other.z, a.z, atol=1e-12, rtol=0)
    c = _run(SPEC, seed=4)
    assert not np.array_equal(c.deltas, a.deltas)


def test_resume_after_cancel_gives_the_same_result(tmp_path) -> None:
    spec = SPEC.model_copy(update={"batch_size": SPEC.n * SPEC.l})  # one sample per group
    full = _run(spec)
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(Cancelled):
        _run(spec, ctx=LocalContext(tmp_path, cancel_flag=cancel_after_two), checkpoint_every_s=0.0)
    state = LocalContext(tmp_path).load_checkpoint("certify")
    assert state is not None and state["done"] == 2

    model, x, y = _tiny()
    seen = []
    orig = model.forward

    def counting(inp):
        seen.append(inp.shape[0])
        return orig(inp)

    model.forward = counting
    progress = []
    ctx = LocalContext(tmp_path, on_progress=lambda s, f, m: progress.append(f))
    resumed = certify_model(model, x, y, Brighten(), spec, seed=3, ctx=ctx, checkpoint_every_s=0.0)
    # clean pass (6) + 4 remaining samples x (l n) transformed inputs
    assert sum(seen) == 6 + 4 * spec.n * spec.l
    assert progress[-1] == 1.0
    assert certificate_body(_cert(resumed)) == certificate_body(_cert(full))
    np.testing.assert_array_equal(resumed.deltas, full.deltas)


def test_nan_outputs_are_refused() -> None:
    from core.errors import InvalidInput

    class NanAbove(nn.Module):
        def forward(self, x):
            out = x.flatten(1)[:, :3].clone()
            out[x.flatten(1).mean(1) > 0.45] = float("nan")
            return out

    x = torch.full((2, 3, 1, 1), 0.4)
    with pytest.raises(InvalidInput, match="NaN"):
        certify_model(NanAbove(), x, torch.zeros(2, dtype=torch.long), Brighten(), SPEC, seed=0)
    with pytest.raises(InvalidInput, match="NaN"):
        certify_model(NanAbove(), x + 0.1, torch.zeros(2, dtype=torch.long), Brighten(), SPEC, seed=0)
