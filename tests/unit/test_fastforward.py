"""core.fastforward and its use by certify_model: the fast forms give eager NCHW float32's numbers
(within 1e-6, independent eager computation) and decisions; a failing compiler falls back to
channels_last, recorded in the certificate, with the same evidence; the compile policy; bf16
precision (spec, certificate, autocast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.certify import build_certificate, certificate_body, certify_model, sample_deltas, sample_record
from core.fastforward import FORM_ENV, flops_per_forward, prepare_forward, should_compile
from core.models import build_model
from core.spec import CertifySpec, JobSpec
from core.transforms import ParametricTransform

SPEC = CertifySpec(n=20, l=3, samples=5, batch_size=40, epsilon=0.05, t_steps=60)


def _model_and_data():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 1).eval()
    with torch.no_grad():  # confident, varied outputs: margins far from 0
        model.classifier.weight.mul_(30)
    x = torch.rand(SPEC.samples, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _eager_reference(model: nn.Module, x: torch.Tensor, spec: CertifySpec, transform) -> tuple:
    """p (S, K) and Z (S, l, n) by plain model(x) in NCHW float32, one sample at a time."""
    ps, zs = [], []
    with torch.no_grad():
        for k in range(x.shape[0]):
            p = model(x[k : k + 1]).double().softmax(1)[0]
            d = sample_deltas(3, k, spec.l, spec.n).reshape(-1)
            xt = transform(x[k : k + 1].expand(len(d), -1, -1, -1), d, torch.full((len(d),), k))
            pt = model(xt).double().softmax(1)
            ps.append(p.numpy())
            zs.append((pt - p).abs().amax(1).numpy().reshape(spec.l, spec.n))
    return np.stack(ps), np.stack(zs)


def _cert(res):
    return build_certificate(
        res, model_info={"arch": "small_cnn"}, mask_sha256=None, dataset={"ref": "t", "sha256": "0"},
        transform={"name": "brightness"},
    )  # fmt: skip


@pytest.mark.parametrize("form", ["auto", "compiled"])
def test_fast_forms_match_an_independent_eager_computation(form, monkeypatch) -> None:
    monkeypatch.setenv(FORM_ENV, form)
    model, x, y = _model_and_data()
    transform = ParametricTransform("brightness", 0.5)
    res = certify_model(model, x, y, transform, SPEC, seed=3)
    assert res.forward["form"] == ("compiled" if form == "compiled" else "channels_last")  # auto: tiny work
    assert res.forward["precision"] == "fp32" and res.forward["fallback"] is None
    p, z = _eager_reference(model, x, SPEC, transform)
    assert np.abs(res.p - p).max() <= 1e-6 and np.abs(res.z - z).max() <= 1e-6
    for k, rec in enumerate(res.samples):
        want = sample_record(k, int(y[k]), p[k], z[k], res.params, "conservative")
        assert rec["certified"] == want["certified"] and rec["pred"] == want["pred"]
        assert abs(rec["epsilon_bound"] - want["epsilon_bound"]) <= 1e-6
    assert sum(r["certified"] for r in res.samples) not in (0, len(res.samples))  # both decisions occur
    assert _cert(res)["software"]["forward"] == res.forward


def _raise_at_compile(*args, **kwargs):
    raise RuntimeError("no C compiler here")


def _raise_at_first_call(module, **kwargs):
    def call(x):
        raise RuntimeError("inductor backend failed")

    return call


@pytest.mark.parametrize("broken", [_raise_at_compile, _raise_at_first_call])
def test_compile_failure_falls_back_with_the_same_certificate(broken, monkeypatch) -> None:
    model, x, y = _model_and_data()
    transform = ParametricTransform("brightness", 0.5)
    monkeypatch.setenv(FORM_ENV, "channels_last")
    plain = certify_model(model, x, y, transform, SPEC, seed=3)
    monkeypatch.setenv(FORM_ENV, "compiled")
    monkeypatch.setattr(torch, "compile", broken)
    fell = certify_model(model, x, y, transform, SPEC, seed=3)
    assert fell.forward["form"] == "channels_last"
    assert fell.forward["fallback"].startswith("torch.compile failed: RuntimeError")
    np.testing.assert_array_equal(fell.z, plain.z)
    np.testing.assert_array_equal(fell.p, plain.p)
    a, b = _cert(fell), _cert(plain)
    assert a["software"]["forward"]["fallback"] and not b["software"]["forward"]["fallback"]
    a["software"]["forward"]["fallback"] = None
    assert certificate_body(a) == certificate_body(b)


def test_compiled_forward_pads_and_caches(monkeypatch) -> None:
    monkeypatch.setenv(FORM_ENV, "compiled")
    model, x, _ = _model_and_data()
    xs = torch.rand(23, 1, 8, 8)
    fwd = prepare_forward(model, (1, 8, 8), 10, device="cpu")
    assert fwd.form == "compiled"
    with torch.no_grad():
        want = model(xs)
    # 23 = 10 + 10 (compiled) + 3 (< batch/2: channels_last); 7 (padded to 10, compiled)
    assert (fwd(xs) - want).abs().max() <= 1e-5 and (fwd(xs[:7]) - want[:7]).abs().max() <= 1e-5
    assert prepare_forward(model, (1, 8, 8), 10, device="cpu") is fwd  # cached: not compiled again
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # weights changed in place: a fresh copy
    again = prepare_forward(model, (1, 8, 8), 10, device="cpu")
    assert again is not fwd and (again(xs) - (want + 1.0)).abs().max() <= 1e-5


def test_compile_policy(monkeypatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    # conv: 2 * Cout * Cin * k * k * H * W; linear: 2 * in * out
    flops = 2 * 8 * 3 * 9 * 16 * 16 + 2 * 8 * 16 * 16 * 5
    assert flops_per_forward(model, (3, 16, 16), torch.device("cpu")) == flops
    monkeypatch.delenv(FORM_ENV, raising=False)
    dev = torch.device("cpu")
    need = int(np.ceil(3e13 / flops))
    assert not should_compile(model, (3, 16, 16), dev, need - 1)
    assert should_compile(model, (3, 16, 16), dev, need)
    assert not should_compile(model, (3, 16, 16), dev, need, compile=False)
    assert should_compile(model, (3, 16, 16), dev, 1, compile=True)
    monkeypatch.setenv(FORM_ENV, "channels_last")
    assert not should_compile(model, (3, 16, 16), dev, 10 * need, compile=True)
    monkeypatch.setenv(FORM_ENV, "compiled")
    assert should_compile(model, (3, 16, 16), dev, 1, compile=False)
    monkeypatch.setenv(FORM_ENV, "eager")  # the reference form: the model itself, as given
    fwd = prepare_forward(model, (3, 16, 16), 4, device="cpu", work=10 * need, compile=True)
    assert fwd.form == "eager" and fwd.net is model and not should_compile(model, (3, 16, 16), dev, need)
    monkeypatch.setenv(FORM_ENV, "sometimes")
    with pytest.raises(ValueError, match=FORM_ENV):
        should_compile(model, (3, 16, 16), dev, 1)


def test_precision_field_and_bf16_forward(monkeypatch) -> None:
    monkeypatch.setenv(FORM_ENV, "channels_last")
    assert CertifySpec().precision == "fp32" and CertifySpec(precision="bf16").precision == "bf16"
    with pytest.raises(ValidationError, match="precision"):
        CertifySpec(precision="fp16")
    with pytest.raises(ValidationError, match="precision"):
        JobSpec.model_validate({"certification": {"precision": "int8"}})
    model, x, y = _model_and_data()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
    fwd = prepare_forward(model, (1, 8, 8), 4, device="cpu", precision="bf16")
    assert fwd.describe()["precision"] == "bf16"
    assert (fwd(x) - want).abs().max() <= 1e-2  # same bf16 function, another memory format
    transform = ParametricTransform("brightness", 0.5)
    res = certify_model(model, x, y, transform, SPEC.model_copy(update={"precision": "bf16"}), seed=3)
    cert = _cert(res)
    assert cert["params"]["precision"] == "bf16" and cert["software"]["forward"]["precision"] == "bf16"
    fp32 = certify_model(model, x, y, transform, SPEC, seed=3)
    assert fp32.params["precision"] == "fp32"
    assert 0 < np.abs(res.z - fp32.z).max() <= 5e-2  # bf16 is another function, close to fp32
