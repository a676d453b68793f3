"""core.calibrate and its use by certification: the batch is the argmax of measured throughput
(selection logic driven by a deterministic fake clock), chosen once and cached in memory and on
disk; certificates do not depend on the batch (real forwards of resnet18 and small_cnn, bounds
within 1e-6 of an independent eager computation, same decisions); the chosen batch is recorded in
the certificate's software block."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from core import calibrate
from core.calibrate import (
    CALIBRATE_ENV,
    CALIBRATION_CACHE_ENV,
    calibrated_batch,
    candidate_batches,
    model_signature,
    pick_batch,
    should_calibrate,
    time_batches,
)
from core.certify import build_certificate, certify_model, sample_deltas
from core.fastforward import FORM_ENV, prepare_forward
from core.models import build_model
from core.spec import CertifySpec
from core.transforms import ParametricTransform


@pytest.fixture(autouse=True)
def _cache_file(tmp_path, monkeypatch) -> Iterator[None]:
    monkeypatch.setenv(CALIBRATION_CACHE_ENV, str(tmp_path / "calibration.json"))
    monkeypatch.setattr(calibrate, "_MEMORY", {})
    yield


class FakeClock:
    """perf_counter stand-in: each run(b) advances it by seconds_per[b]; reading it costs nothing."""

    def __init__(self, seconds_per: dict[int, float]) -> None:
        self.now, self.seconds_per, self.runs = 0.0, seconds_per, []

    def __call__(self) -> float:
        return self.now

    def run(self, b: int) -> None:
        self.runs.append(b)
        self.now += self.seconds_per[b]


def test_candidates_stay_within_the_memory_cap() -> None:
    assert candidate_batches(500, 682) == [125, 250, 500, 682]
    assert candidate_batches(500, 10_000) == [125, 250, 500, 1000]
    assert candidate_batches(40, 30) == [16, 20, 30]
    assert candidate_batches(4, 1000) == [4, 8]


def test_selection_is_the_argmax_of_measured_throughput() -> None:
    # inputs/s: 125 -> 250, 250 -> 312.5, 500 -> 277.8, 1000 -> 250
    clock = FakeClock({125: 0.5, 250: 0.8, 500: 1.8, 1000: 4.0})
    seconds = time_batches(clock.run, [125, 250, 500, 1000], clock)
    assert seconds == pytest.approx({125: 0.5, 250: 0.8, 500: 1.8, 1000: 4.0})
    assert clock.runs == [125, 125, 250, 250, 500, 500, 1000, 1000]  # one warm-up, one timed each
    assert pick_batch(seconds) == 250
    assert pick_batch({64: 1.0, 128: 2.0}) == 64  # a tie goes to the smaller batch
    with pytest.raises(ValueError):
        pick_batch({})


def test_calibration_is_measured_once_then_cached_in_memory_and_on_disk(tmp_path) -> None:
    clock = FakeClock({125: 0.5, 250: 0.8, 500: 1.8, 1000: 4.0})
    assert calibrated_batch(clock.run, 500, 4000, "k", clock) == (250, "measured")
    assert len(clock.runs) == 8
    assert calibrated_batch(clock.run, 500, 4000, "k", clock) == (250, "cached")
    assert len(clock.runs) == 8  # nothing timed again
    assert json.loads((tmp_path / "calibration.json").read_text()) == {"k": 250}
    calibrate._MEMORY.clear()  # a new process: the file answers
    assert calibrated_batch(clock.run, 500, 4000, "k", clock) == (250, "cached")
    assert len(clock.runs) == 8
    other = FakeClock({125: 0.1, 250: 0.8, 500: 1.8, 1000: 4.0})
    assert calibrated_batch(other.run, 500, 4000, "other key", other) == (125, "measured")


def test_calibration_policy(monkeypatch) -> None:
    assert not should_calibrate(1e12) and should_calibrate(1e14)
    assert should_calibrate(0, calibrate=True) and not should_calibrate(1e14, calibrate=False)
    monkeypatch.setenv(CALIBRATE_ENV, "off")
    assert not should_calibrate(1e14, calibrate=True)
    monkeypatch.setenv(CALIBRATE_ENV, "on")
    assert should_calibrate(0)
    monkeypatch.setenv(CALIBRATE_ENV, "sometimes")
    with pytest.raises(ValueError, match=CALIBRATE_ENV):
        should_calibrate(0)


def test_signature_ignores_weights_but_not_architecture() -> None:
    a, b = build_model("small_cnn", 4, 1), build_model("small_cnn", 4, 1)
    with torch.no_grad():
        b.classifier.weight.zero_()
    assert model_signature(a) == model_signature(b) != model_signature(build_model("small_cnn", 5, 1))


def _independent(model, x, spec, transform, seed) -> tuple[np.ndarray, np.ndarray]:
    """p (S, K) and Z (S, l, n): plain eager NCHW float32, one sample at a time."""
    ps, zs = [], []
    with torch.no_grad():
        for k in range(x.shape[0]):
            p = model(x[k : k + 1]).double().softmax(1)[0]
            d = sample_deltas(seed, k, spec.l, spec.n).reshape(-1)
            pt = model(transform(x[k : k + 1].expand(len(d), -1, -1, -1), d, torch.full((len(d),), k)))
            ps.append(p.numpy())
            zs.append((pt.double().softmax(1) - p).abs().amax(1).numpy().reshape(spec.l, spec.n))
    return np.stack(ps), np.stack(zs)


@pytest.mark.parametrize("arch,shape,scale", [
    ("resnet18", (3, 32, 32), 30), ("resnet18", (3, 32, 32), 1), ("small_cnn", (1, 8, 8), 30)])
def test_certificates_do_not_depend_on_the_batch(arch, shape, scale, monkeypatch) -> None:
    """scale 30: confident outputs as a trained model's (bounds within 1e-6); scale 1: margins
    near the sampled Z, bounds of 0.19 and 0.38 whose optimal t (~1e2) multiplies Z's kernel rounding
    (~1e-7), so they agree to 1e-4 relative, and every decision is the same."""
    torch.manual_seed(0)
    model = build_model(arch, 4, shape[0], small_input=True).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[2] = (y[2] + 1) % 4  # one misclassified sample
    transform = ParametricTransform("brightness", 0.5)
    spec = CertifySpec(n=20, l=2, samples=3, epsilon=0.05, t_steps=60)
    p_ref, z_ref = _independent(model, x, spec, transform, 5)
    monkeypatch.setenv(CALIBRATE_ENV, "off")
    results = [certify_model(model, x, y, transform, spec.model_copy(update={"batch_size": b}), seed=5)
               for b in (1, 7, 64, 500)]
    monkeypatch.setenv(CALIBRATE_ENV, "on")
    results.append(certify_model(model, x, y, transform, spec.model_copy(update={"batch_size": 40}), seed=5))
    assert [r.forward["batch"] for r in results[:4]] == [1, 7, 64, 500]
    assert results[4].forward["batch_calibrated"] and results[4].forward["batch_requested"] == 40
    assert results[4].forward["batch"] in candidate_batches(40, 10**9) == [16, 20, 40, 80]
    for r in results:
        assert np.abs(r.p - p_ref).max() < 1e-6 and np.abs(r.z - z_ref).max() < 1e-6
        assert [s["certified"] for s in r.samples] == [s["certified"] for s in results[0].samples]
        assert [s["pred"] for s in r.samples] == [s["pred"] for s in results[0].samples]
        bounds = np.array([s["epsilon_bound"] for s in r.samples])
        first = np.array([s["epsilon_bound"] for s in results[0].samples])
        assert np.abs(bounds - first).max() < (1e-6 if scale > 1 else 1e-4 * first.max())
    if scale == 1:
        assert first.max() > 0.1 and not all(s["certified"] for s in results[0].samples)


def test_the_calibrated_batch_runs_and_is_recorded(monkeypatch) -> None:
    monkeypatch.setenv(CALIBRATE_ENV, "on")
    monkeypatch.setenv(FORM_ENV, "channels_last")
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 1).eval()
    fwd = prepare_forward(model, (1, 8, 8), 64, device="cpu")
    assert fwd.batch in (16, 32, 64, 128) and fwd.describe()["batch_calibrated"]
    calls = []
    fwd.net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    x = torch.rand(300, 1, 8, 8)
    out = fwd(x)
    assert calls == [fwd.batch] * (300 // fwd.batch) + ([300 % fwd.batch] if 300 % fwd.batch else [])
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)
    assert prepare_forward(model, (1, 8, 8), 64, device="cpu") is fwd  # prepared and calibrated once
    labels = torch.zeros(2, dtype=torch.int64)
    res = certify_model(model, x[:2], labels, ParametricTransform("brightness", 0.5),
                        CertifySpec(n=10, l=2, samples=2, batch_size=64), seed=0)
    cert = build_certificate(res, model_info={"arch": "small_cnn"}, mask_sha256=None,
                             dataset={"ref": "t", "sha256": "0"}, transform={"name": "brightness"})
    ran = cert["software"]["forward"]
    assert ran["batch"] == res.forward["batch"] and ran["batch_calibrated"] is True
    assert ran["batch_requested"] == 64
