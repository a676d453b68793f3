"""core.bounds: the Clopper-Pearson bound against an independent binomial CDF inversion, its
coverage (exactly and by simulation through certify_model), and exact early stopping."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import torch

from core.bounds import (
    binomial_k_max,
    cccert_can_stop,
    clopper_pearson_upper,
    draws_needed,
    stop_reason,
)
from core.certify import build_certificate, certify_model, verify_certificate, write_certificate
from core.spec import CertifySpec, JobSpec
from tests.unit.test_certify import LogitShift, _linear_model, _soundness_inputs, _true_failure


def _binom_cdf(k: int, n: int, q) -> mpmath.mpf:
    return mpmath.fsum(mpmath.binomial(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1))


def _upper_by_bisection(k: int, n: int, beta: float) -> float:
    """The q in (0, 1) with P(Bin(n, q) <= k) = beta, by bisection on a 50-digit binomial CDF."""
    with mpmath.workdps(50):
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        for _ in range(120):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _binom_cdf(k, n, mid) > beta else (lo, mid)
        return float((lo + hi) / 2)


@pytest.mark.parametrize(
    ("k", "n", "beta"),
    [(0, 1, 0.05), (0, 1000, 1e-3), (3, 50, 0.05), (7, 200, 1e-3), (49, 50, 0.1), (12, 5000, 1e-6)],
)
def test_clopper_pearson_matches_cdf_inversion(k: int, n: int, beta: float) -> None:
    assert clopper_pearson_upper(k, n, beta) == pytest.approx(_upper_by_bisection(k, n, beta), rel=1e-9)


def test_clopper_pearson_closed_form_and_edges() -> None:
    for n in (1, 10, 1000, 6908):
        assert clopper_pearson_upper(0, n, 1e-3) == pytest.approx(1 - 1e-3 ** (1 / n), rel=1e-12)
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert clopper_pearson_upper(0, 1000, 1e-3) == pytest.approx(6.9e-3, abs=1e-4)  # the floor
    ups = [clopper_pearson_upper(k, 300, 0.01) for k in range(301)]
    assert all(a < b for a, b in zip(ups, ups[1:], strict=False))  # increasing in k


def test_draws_needed_and_k_max() -> None:
    for eps, beta in ((1e-3, 1e-3), (0.05, 0.05), (1e-2, 1e-6)):
        n = draws_needed(eps, beta)
        assert clopper_pearson_upper(0, n, beta) <= eps < clopper_pearson_upper(0, n - 1, beta)
        assert n <= math.log(1 / beta) / eps + 1  # the README's rule N >= ln(1/beta) / epsilon
    assert draws_needed(1e-3, 1e-3) == 6905
    assert binomial_k_max(1000, 1e-3, 1e-3) == -1  # the default n l cannot certify at epsilon 1e-3
    km = binomial_k_max(100, 0.05, 0.05)
    assert km == 1 and clopper_pearson_upper(km, 100, 0.05) <= 0.05 < clopper_pearson_upper(km + 1, 100, 0.05)


def test_exact_coverage_never_below_one_minus_beta() -> None:
    """P_q(U(K, N) < q) <= beta for K ~ Bin(N, q), summed exactly over K, on a grid of q."""
    n, beta = 60, 0.05
    ups = np.array([clopper_pearson_upper(k, n, beta) for k in range(n + 1)])
    from scipy.stats import binom

    worst = max(binom.pmf(np.arange(n + 1), n, q)[ups < q].sum() for q in np.linspace(0.001, 0.999, 400))
    assert 0.03 < worst <= beta  # close to beta somewhere: the bound is not vacuously loose


def test_binomial_false_certification_rate_by_simulation() -> None:
    """1000 copies of one input whose true P(Z >= d) = q is just above epsilon: each copy has its own
    draws (the delta seed depends on the index), so the share certified is the empirical failure
    rate of the binomial bound; it stays <= beta and matches the exact P(Bin(N, q) <= k_max)."""
    from scipy.stats import binom

    a, copies, beta, eps = 1.067, 1000, 0.05, 0.05
    xv = np.array([a, 0.5, 0.2])
    q = _true_failure(xv)
    assert eps < q < 1.2 * eps
    x = torch.tensor(xv, dtype=torch.float32).view(1, 3, 1, 1).repeat(copies, 1, 1, 1)
    y = torch.zeros(copies, dtype=torch.long)
    spec = CertifySpec(
        n=20, l=5, samples=copies, epsilon=eps, bound="binomial", failure_probability=beta, batch_size=10_000
    )
    res = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=11)
    rate = np.mean([r["certified"] for r in res.samples])
    exact = binom.cdf(binomial_k_max(100, beta, eps), 100, q)
    sigma = math.sqrt(exact * (1 - exact) / copies)
    assert rate <= beta
    assert abs(rate - exact) <= 4 * sigma + 0.005
    assert rate > 0  # the test measures something


def test_cccert_stop_condition() -> None:
    assert cccert_can_stop(100, 0.9, 1e-3) and not cccert_can_stop(100, 0.9, 1 / 90)
    cc = {"n": 100, "l": 10, "alpha": 0.9, "beta": None}
    assert stop_reason("cccert", correct=False, failures=0, **{**cc, "n": 5}, epsilon=0.5)
    assert stop_reason("cccert", correct=True, failures=1, **cc, epsilon=1e-3)
    assert stop_reason("cccert", correct=True, failures=0, **cc, epsilon=1e-3) is None
    assert stop_reason("cccert", correct=True, failures=3, **cc, epsilon=0.02) is None
    kw = {"n": 20, "l": 5, "alpha": 0.9, "epsilon": 0.05, "beta": 0.05}
    assert stop_reason("binomial", correct=True, failures=1, **kw) is None
    assert stop_reason("binomial", correct=True, failures=2, **kw)


# ----------------------------------------------------------------------------- early stopping
def _both(spec: CertifySpec, seed: int = 7):
    x, y = _soundness_inputs()
    full = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=seed)
    early = certify_model(
        _linear_model(), x, y, LogitShift(), spec.model_copy(update={"early_stop": True}), seed=seed
    )
    return full, early


@pytest.mark.parametrize(
    "update",
    [
        {},
        {"bound_order": "reference"},
        {"bound": "binomial", "epsilon": 0.02, "failure_probability": 0.05},
        {"bound": "binomial", "epsilon": 1e-3},  # k_max = -1: nothing sampled
        {"epsilon": 0.02},
    ],
)  # 1/(n alpha) < epsilon: cccert cannot stop on Z >= d
def test_early_stop_gives_the_full_runs_decisions(update: dict, tmp_path) -> None:
    spec = CertifySpec(n=100, l=10, samples=23, batch_size=700).model_copy(update=update)
    full, early = _both(spec)
    assert [r["certified"] for r in early.samples] == [r["certified"] for r in full.samples]
    assert early.pca == full.pca and early.accuracy == full.accuracy
    total = spec.n * spec.l
    assert full.forward_passes == 23 + 23 * total and (full.draws == total).all()
    assert early.forward_passes == 23 + int(early.draws.sum()) < full.forward_passes
    for r, f, m in zip(early.samples, full.samples, early.draws, strict=True):
        assert r["draws"] == m and m % spec.n == 0
        if m == total:  # not stopped: the full run's record
            assert r == f
        else:  # stopped: what was sampled is the full run's prefix
            assert not r["certified"] and r["epsilon_bound"] == 1.0 and r["failures"] <= f["failures"]
        if r["pred"] != r["label"]:
            assert m == 0 and r["max_z"] is None
    k = int(np.argmin(early.draws))
    np.testing.assert_array_equal(
        early.z[k].reshape(-1)[: early.draws[k]], full.z[k].reshape(-1)[: early.draws[k]]
    )
    assert np.isnan(early.z[k].reshape(-1)[early.draws[k] :]).all()
    cert = build_certificate(
        early,
        model_info={"arch": "linear"},
        mask_sha256=None,
        dataset={"ref": "synthetic", "sha256": "0"},
        transform={"name": "shift"},
    )
    assert cert["forward_passes"] == early.forward_passes and cert["params"]["early_stop"] is True
    cp, _ = write_certificate(cert, early, tmp_path)
    assert verify_certificate(cp) == []


def test_verify_rejects_an_unjustified_stop(tmp_path) -> None:
    spec = CertifySpec(n=100, l=10, samples=23, batch_size=700, early_stop=True)
    x, y = _soundness_inputs()
    res = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=7)
    cert = build_certificate(
        res,
        model_info={"arch": "linear"},
        mask_sha256=None,
        dataset={"ref": "synthetic", "sha256": "0"},
        transform={"name": "shift"},
    )
    cp, ep = write_certificate(cert, res, tmp_path)
    # the same evidence presented as a run without early stopping
    bad = json.loads(cp.read_text())
    bad["params"]["early_stop"] = False
    (tmp_path / "b.json").write_text(json.dumps(bad))
    assert any("stopping reason" in m for m in verify_certificate(tmp_path / "b.json", ep))
    # a correctly classified stopped sample whose failing Z are lowered below d (hash updated too)
    k = next(i for i, r in enumerate(res.samples) if r["draws"] < 1000 and r["pred"] == r["label"])
    z = res.z.copy()
    m = res.draws[k]
    z[k].reshape(-1)[:m] = np.minimum(z[k].reshape(-1)[:m], res.samples[k]["d"] / 2)
    res.z = z
    res.samples[k] = {**res.samples[k], "failures": 0, "max_z": float(np.max(z[k].reshape(-1)[:m]))}
    forged = build_certificate(
        res,
        model_info={"arch": "linear"},
        mask_sha256=None,
        dataset={"ref": "synthetic", "sha256": "0"},
        transform={"name": "shift"},
    )
    cp2, _ = write_certificate(forged, res, tmp_path / "forged")
    msgs = verify_certificate(cp2)
    assert any(f"sample {k}: stopped after" in m for m in msgs), msgs


def test_spec_fields() -> None:
    spec = JobSpec.model_validate(
        {"certification": {"bound": "binomial", "failure_probability": 0.01, "early_stop": True}}
    )
    assert spec.certification.bound == "binomial" and spec.certification.early_stop
    assert JobSpec().certification.bound == "cccert" and JobSpec().certification.failure_probability == 1e-3
    for bad in ({"bound": "hoeffding"}, {"failure_probability": 0.0}, {"failure_probability": 1.0}):
        with pytest.raises(ValueError):
            JobSpec.model_validate({"certification": bad})


def test_early_stop_resumes_to_the_same_certificate(tmp_path) -> None:
    from core.certify import certificate_body
    from core.context import LocalContext
    from core.errors import Cancelled

    spec = CertifySpec(n=100, l=10, samples=23, batch_size=100, early_stop=True)  # one sample per group
    x, y = _soundness_inputs()
    full = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=7)
    calls = {"n": 0}

    def cancel_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] >= 5

    ctx = LocalContext(tmp_path, cancel_flag=cancel_after_five)
    with pytest.raises(Cancelled):
        certify_model(_linear_model(), x, y, LogitShift(), spec, seed=7, ctx=ctx, checkpoint_every_s=0.0)
    assert LocalContext(tmp_path).load_checkpoint("certify")["done"] == 5
    resumed = certify_model(_linear_model(), x, y, LogitShift(), spec, seed=7, ctx=LocalContext(tmp_path))

    def cert(res):
        return build_certificate(
            res,
            model_info={"arch": "linear"},
            mask_sha256=None,
            dataset={"ref": "synthetic", "sha256": "0"},
            transform={"name": "shift"},
        )

    assert certificate_body(cert(resumed)) == certificate_body(cert(full))
    np.testing.assert_array_equal(resumed.deltas, full.deltas)
