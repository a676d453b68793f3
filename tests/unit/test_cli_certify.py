"""`carcert certify` / `carcert verify` end to end on the digits dataset with a briefly trained
small CNN (weights and masks written through core.models / core.masking)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carcert.cli import main
from core.certify import certificate_body
from core.data import load_dataset
from core.masking import prunable_weights, save_masks, topk_mask
from core.models import build_model, file_sha256, save_weights

DESIGN_KEYS = {"job_id", "created_at", "software", "model", "mask_sha256", "dataset", "transform", "params",
               "failure_probability", "accuracy", "pca", "samples"}
SAMPLE_KEYS = {"index", "label", "pred", "d", "max_z", "epsilon_bound", "t_star", "certified", "draws",
               "failures"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    model = build_model("small_cnn", data.num_classes, data.in_channels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(data.train_x.shape[0], generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(data.train_x[b]), data.train_y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    d = tmp_path_factory.mktemp("cli")
    weights = d / "model.safetensors"
    save_weights(model.eval(), weights)
    masks = topk_mask({k: v.detach() for k, v in prunable_weights(model).items()}, 0.5)
    mask_sha = save_masks(d / "mask.safetensors", masks)
    return weights, d / "mask.safetensors", mask_sha


def _certify(weights: Path, out: Path, *extra: str) -> int:
    return main(["certify", "--arch", "small_cnn", "--weights", str(weights), "--dataset", "digits",
                 "--transform", "brightness", "--strength", "0.2", "--n", "20", "--l", "3", "--samples", "12",
                 "--epsilon", "0.01", "--t-steps", "100", "--seed", "5", "--quiet", "--out", str(out),
                 *extra])


def test_certify_and_verify(trained, tmp_path, capsys) -> None:
    weights, _, _ = trained
    out = tmp_path / "cert.json"
    assert _certify(weights, out) == 0
    ev = tmp_path / "cert.evidence.npz"
    assert out.exists() and ev.exists()
    assert not (tmp_path / ".cert.work").exists()
    cert = json.loads(out.read_text())
    assert set(cert) >= DESIGN_KEYS and cert["bound_order"] == "conservative"
    assert all(set(s) == SAMPLE_KEYS for s in cert["samples"])
    assert cert["params"] == {"n": 20, "l": 3, "alpha": 0.9, "epsilon": 0.01, "t_min": 1e-4, "t_max": 1e4,
                              "t_steps": 100, "seed": 5, "samples": 12, "bound": "cccert", "beta": None,
                              "early_stop": False, "precision": "fp32"}
    assert cert["forward_passes"] == 12 + 12 * 60 and cert["guarantee"]["bound"] == "cccert"
    assert cert["model"]["sha256"] == file_sha256(weights) and cert["mask_sha256"] is None
    data = load_dataset("digits", seed=5)
    assert cert["dataset"] == {"ref": "digits", "sha256": data.sha256, "split_seed": 0, "train_subset": None}
    # --seed 5 certifies the test split the seed-0 model was trained against (issue 10, point 3)
    assert torch.equal(data.test_x, load_dataset("digits", seed=0).test_x)
    assert [s["label"] for s in cert["samples"]] == data.test_y[:12].tolist()
    # predictions are those of the saved model on the test samples
    model = build_model("small_cnn", 10, 1)
    from core.models import load_weights

    load_weights(model, weights)
    with torch.no_grad():
        preds = model.eval()(data.test_x[:12]).argmax(1).tolist()
    assert [s["pred"] for s in cert["samples"]] == preds
    assert cert["accuracy"] == pytest.approx(np.mean(np.array(preds) == data.test_y[:12].numpy()))
    assert cert["accuracy"] >= 0.7 and cert["pca"] > 0  # trained model, mild transform
    assert cert["pca"] == sum(s["certified"] for s in cert["samples"]) / 12
    assert cert["failure_probability"] == pytest.approx((1 / (1 + 20 * 0.01)) ** 3)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1  # the model is not beside the certificate
    assert "pass --model" in capsys.readouterr().out
    assert main(["verify", str(out), "--no-files"]) == 0
    assert main(["verify", str(out), "--model", str(weights), "--recompute"]) == 0
    assert "OK" in capsys.readouterr().out
    # tampering is reported and exits 1
    cert["samples"][3]["epsilon_bound"] = 0.0 if cert["samples"][3]["epsilon_bound"] else 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cert))
    assert main(["verify", str(bad), "--evidence", str(ev)]) == 1
    assert "MISMATCH sample 3: epsilon_bound" in capsys.readouterr().out
    # same inputs and seed: the same certificate body, byte for byte (README: created_at and job_id
    # are outside the body), and byte-identical evidence
    out2 = tmp_path / "again.json"
    assert _certify(weights, out2) == 0
    a, b = out.read_text(), out2.read_text()
    assert certificate_body(json.loads(a)) == certificate_body(json.loads(b))
    assert [x for x in a.splitlines() if '"created_at"' not in x] == \
        [x for x in b.splitlines() if '"created_at"' not in x]
    assert ev.read_bytes() == (tmp_path / "again.evidence.npz").read_bytes()


def test_certify_with_mask(trained, tmp_path) -> None:
    weights, mask, mask_sha = trained
    out = tmp_path / "masked.json"
    assert _certify(weights, out, "--mask", str(mask), "--bound-order", "reference") == 0
    cert = json.loads(out.read_text())
    assert cert["mask_sha256"] == mask_sha == file_sha256(mask)
    assert cert["bound_order"] == "reference"
    from core.masking import load_masks

    m = load_masks(mask)
    kept = sum(int(v.sum()) for v in m.values())
    total = sum(v.numel() for v in m.values())
    assert cert["model"]["params"] == total
    assert cert["model"]["nonzero"] <= kept and cert["model"]["sparsity"] >= 1 - kept / total - 1e-12
    assert cert["model"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert main(["verify", str(out), "--model", str(weights), "--mask", str(mask), "--recompute"]) == 0
    assert main(["verify", str(out), "--model", str(weights)]) == 1  # the mask is part of the model


def test_binomial_early_stop_from_the_cli(trained, tmp_path, capsys) -> None:
    """--bound binomial --early-stop: the full run's decisions with fewer forward passes, the
    guarantee in words, and a certificate that verifies."""
    weights, _, _ = trained
    opts = ("--bound", "binomial", "--failure-probability", "0.05", "--epsilon", "0.1")
    assert _certify(weights, tmp_path / "full.json", *opts) == 0
    assert _certify(weights, tmp_path / "early.json", *opts, "--early-stop") == 0
    full, early = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "early"))
    assert early["params"]["bound"] == "binomial" and early["params"]["beta"] == 0.05
    assert early["params"]["early_stop"] and early["failure_probability"] == 0.05
    assert "1 - beta" in early["guarantee"]["statement"] and early["guarantee"]["assumptions"]
    assert [s["certified"] for s in early["samples"]] == [s["certified"] for s in full["samples"]]
    assert early["pca"] == full["pca"] and full["forward_passes"] == 12 + 12 * 60
    assert _certify(weights, tmp_path / "early2.json", *opts, "--early-stop") == 0
    again = json.loads((tmp_path / "early2.json").read_text())
    assert certificate_body(again) == certificate_body(early)  # early stopping is deterministic too
    assert early["forward_passes"] == 12 + sum(s["draws"] for s in early["samples"]) <= full["forward_passes"]
    assert "forward passes" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "early.json"), "--model", str(weights), "--recompute"]) == 0


def test_bf16_precision_is_certified_recorded_and_recomputed(trained, tmp_path, capsys) -> None:
    """--precision bf16: the certificate says so (params and software.forward), `verify --recompute`
    reruns in bf16 (OK), and the same evidence claimed as fp32 fails the recomputation."""
    weights, _, _ = trained
    assert _certify(weights, tmp_path / "fp32.json") == 0
    assert _certify(weights, tmp_path / "bf16.json", "--precision", "bf16") == 0
    fp32, bf16 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fp32", "bf16"))
    assert fp32["params"]["precision"] == "fp32" and bf16["params"]["precision"] == "bf16"
    assert bf16["software"]["forward"]["precision"] == "bf16"
    assert bf16["software"]["forward"]["form"] in ("eager", "channels_last")  # tiny run: not compiled
    assert main(["verify", str(tmp_path / "bf16.json"), "--model", str(weights), "--recompute"]) == 0
    with np.load(tmp_path / "fp32.evidence.npz") as a, np.load(tmp_path / "bf16.evidence.npz") as b:
        assert np.abs(a["p"] - b["p"]).max() > 1e-6  # bf16 is another function
    claimed = dict(bf16, params={**bf16["params"], "precision": "fp32"})
    (tmp_path / "claimed.json").write_text(json.dumps(claimed))
    ev = str(tmp_path / "bf16.evidence.npz")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "claimed.json"), "--evidence", ev, "--model", str(weights)]) == 0
    code = main(["verify", str(tmp_path / "claimed.json"), "--evidence", ev, "--model", str(weights),
                 "--recompute"])
    assert code == 1 and "(fp32" in capsys.readouterr().out


def test_bad_options_exit_2(trained, tmp_path, capsys) -> None:
    weights, _, _ = trained
    assert main(["certify", "--arch", "small_cnn", "--weights", str(weights), "--dataset", "digits",
                 "--transform", "sunburn", "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sunburn" in err and "illumination" in err
    assert _certify(weights, tmp_path / "y.json", "--alpha", "1.5") == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing.json")]) == 2
