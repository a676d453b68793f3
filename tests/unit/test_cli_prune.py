"""`carcert prune` through carcert.cli.main on digits (tiny epochs and certification)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from carcert.cli import build_parser, main
from carcert.cli_prune import build_spec, transform_spec
from core.certify import verify_certificate
from core.data import load_dataset
from core.errors import TransformError
from core.masking import load_masks
from core.models import build_model, file_sha256, load_weights, save_weights
from core.training import evaluate

TINY = ["--dataset", "digits", "--transform", "brightness", "--epochs", "1", "--batch-size", "32",
        "--lr", "0.1", "--train-subset", "300", "--augment-q", "50", "--n", "10", "--l", "2",
        "--samples", "5", "--t-steps", "50", "--device", "cpu", "--quiet"]


def _args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["prune", "--arch", "small_cnn", "--out", "x", *extra])


def test_prune_lmp_end_to_end(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "out"
    code = main(["prune", "--arch", "small_cnn", "--method", "lmp", "--prune-ratio", "0.5", *TINY,
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for f in ("model.safetensors", "mask.safetensors", "metrics.json", "certificate.json", "evidence.npz"):
        assert (out / f).is_file(), f
    assert not (out / ".carcert-work").exists()  # checkpoints removed after success
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lmp" and metrics["prune_ratio"] == 0.5
    model = build_model("small_cnn", 10, 1)
    load_weights(model, out / "model.safetensors")
    data = load_dataset("digits", seed=0, train_subset=300)
    assert evaluate(model, data.test_x, data.test_y) == metrics["accuracy"]
    masks = load_masks(out / "mask.safetensors")
    assert all(int(m.sum()) == round(0.5 * m.numel()) for m in masks.values())
    assert verify_certificate(out / "certificate.json") == []
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["model"]["sha256"] == file_sha256(out / "model.safetensors")
    assert cert["mask_sha256"] == file_sha256(out / "mask.safetensors")
    # the summary table: header + one row with the measured numbers
    row = next(line for line in printed.splitlines() if line.startswith("lmp-0.50"))
    assert f"{metrics['accuracy']:.4f}" in row and f"{metrics['pca']:.4f}" in row
    assert "variant" in printed and "PCA" in printed
    _verify_detects_the_audits_tampering(out, capsys)


def _verify_detects_the_audits_tampering(out: Path, capsys) -> None:
    """Issue 10, point 2: a flipped byte in model.safetensors, a false model.sparsity or a removed
    evidence_sha256 all passed `carcert verify` (exit 0); each is now a mismatch (exit 1)."""
    import shutil

    cert_path = out / "certificate.json"
    capsys.readouterr()
    assert main(["verify", str(cert_path), "--recompute"]) == 0
    assert "recomputed p and Z" in capsys.readouterr().out
    for case in ("flip", "sparsity", "no-hash", "mask"):
        bad = out.parent / f"bad-{case}"
        shutil.copytree(out, bad)
        cert = json.loads((bad / "certificate.json").read_text())
        if case == "flip":
            raw = bytearray((bad / "model.safetensors").read_bytes())
            raw[-3] ^= 0x01  # a tensor byte near the end
            (bad / "model.safetensors").write_bytes(bytes(raw))
        elif case == "sparsity":
            cert["model"]["sparsity"] = 0.9
        elif case == "no-hash":
            del cert["evidence_sha256"]
        else:
            (bad / "mask.safetensors").unlink()
        (bad / "certificate.json").write_text(json.dumps(cert))
        assert main(["verify", str(bad / "certificate.json")]) == 1, case
        shown = capsys.readouterr().out
        expected = {"flip": "model.sha256", "sparsity": "model.sparsity", "no-hash": "evidence_sha256",
                    "mask": "no mask file"}[case]
        assert expected in shown, (case, shown)
    # --recompute catches a model that is not the one that produced the evidence, even with the
    # certificate's hashes rewritten to match it
    bad = out.parent / "bad-model"
    shutil.copytree(out, bad)
    state = {k: v.clone() for k, v in __import__("safetensors.torch").torch.load_file(
        str(bad / "model.safetensors")).items()}
    state["classifier.weight"] *= 1.5  # same zeros (sparsity, mask), different outputs
    model = build_model("small_cnn", 10, 1)
    model.load_state_dict(state)
    cert = json.loads((bad / "certificate.json").read_text())
    cert["model"]["sha256"] = save_weights(model, bad / "model.safetensors")
    (bad / "certificate.json").write_text(json.dumps(cert))
    assert main(["verify", str(bad / "certificate.json")]) == 0
    assert main(["verify", str(bad / "certificate.json"), "--recompute"]) == 1
    assert "differ from the evidence" in capsys.readouterr().out


def test_vanilla_with_user_weights_skips_training(tmp_path: Path) -> None:
    torch.manual_seed(5)
    src = build_model("small_cnn", 10, 1)
    save_weights(src, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    assert main(["prune", "--arch", "small_cnn", "--method", "vanilla", "--weights",
                 str(tmp_path / "w.safetensors"), *TINY, "--out", str(out)]) == 0
    assert not (out / "mask.safetensors").exists()
    got = build_model("small_cnn", 10, 1)
    load_weights(got, out / "model.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    assert json.loads((out / "metrics.json").read_text())["pretrained"] == "user weights"


def test_sweep_writes_one_folder_per_variant(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prune", "--arch", "small_cnn", "--method", "vanilla,lmp", "--prune-ratio", "0.3,0.6",
                 *TINY, "--out", str(out)]) == 0
    names = ["vanilla-0.00", "lmp-0.30", "lmp-0.60"]
    summary = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == names
    for name in names:
        assert (out / name / "certificate.json").is_file()
    for name, ratio in (("lmp-0.30", 0.3), ("lmp-0.60", 0.6)):
        masks = load_masks(out / name / "mask.safetensors")
        assert all(int(m.sum()) == round((1 - ratio) * m.numel()) for m in masks.values())


def test_work_dir_resumes_only_with_the_same_options(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--arch", "small_cnn", "--method", "lmp", *TINY, "--out", str(out)]
    assert main([*argv, "--keep-work"]) == 0
    work = out / ".carcert-work"
    assert (work / "lmp-0.50" / "certificate.json").is_file() and (work / "checkpoints").is_dir()
    first = (out / "certificate.json").read_text()
    stamp = (work / "lmp-0.50" / "certificate.json").stat().st_mtime_ns
    assert main([*argv, "--keep-work"]) == 0  # same options: the finished variant is reused
    assert (work / "lmp-0.50" / "certificate.json").stat().st_mtime_ns == stamp
    assert (out / "certificate.json").read_text() == first
    assert main([*argv, "--seed", "1"]) == 0  # other options: old checkpoints discarded, new result
    assert json.loads((out / "certificate.json").read_text())["params"]["seed"] == 1
    assert not work.exists()
    capsys.readouterr()


def test_bad_arch_exits_2_with_message(tmp_path: Path, capsys) -> None:
    argv = ["prune", "--arch", "vgg16", "--dataset", "digits", "--method", "lmp", "--out", str(tmp_path)]
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert "vgg16" in err and "small_cnn" in err and "resnet18" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "prune-it"], "unknown --method"),
        (["--method", "lmp", "--prune-ratio", "1.5"], "prune_ratio"),
        (["--method", "lmp", "--prune-ratio", "half"], "--prune-ratio"),
        (["--method", "lmp", "--transform", "latent:pca:x"], "latent:pca:K"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    code = main(["prune", "--arch", "small_cnn", "--dataset", "digits", *argv, "--out", str(tmp_path)])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_unknown_transform_name_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["prune", "--arch", "small_cnn", "--method", "vanilla", *TINY, "--transform", "sepia",
                 "--out", str(tmp_path)])
    assert code == 2
    assert "sepia" in capsys.readouterr().err


def test_transform_spec_parsing() -> None:
    assert transform_spec("illumination") == {"kind": "parametric", "name": "illumination", "strength": 1.0}
    assert transform_spec("brightness+blur", strength=2.0)["name"] == "brightness+blur"
    assert transform_spec("latent:pca:3") == {"kind": "latent", "component": 3, "strength": 1.0}
    assert transform_spec("latent:pca")["component"] == 0
    assert transform_spec("pca", component=2)["component"] == 2
    assert transform_spec("precomputed")["kind"] == "precomputed"
    with pytest.raises(TransformError):
        transform_spec("latent")
    with pytest.raises(TransformError):
        transform_spec("latent:pca:-1")


def test_build_spec_maps_options() -> None:
    spec = build_spec(_args("--dataset", "digits", "--method", "car", "--prune-ratio", "0.7", "--epochs", "3",
                            "--finetune-epochs", "5", "--lambda-ratio", "0", "--tau", "0.2", "--n", "7",
                            "--seed", "4", "--scope", "global", "--mask-lr", "0.002",
                            "--mask-optimizer", "sgd", "--ratio-mask", "soft", "--search-bn", "batch",
                            "--lambda-ce", "0", "--ratio-rows", "all", "--ratio-cap", "3", "--amp",
                            "--bn-every", "7"))
    assert spec.pruning.method == "car" and spec.pruning.prune_ratio == 0.7 and spec.pruning.scope == "global"
    p = spec.pruning
    assert (p.pretrain_epochs, p.search_epochs, p.finetune_epochs) == (3, 3, 5)
    assert spec.pruning.car.lambda_ratio == 0.0 and spec.pruning.car.tau == 0.2
    c = spec.pruning.car
    assert (c.mask_lr, c.mask_optimizer, c.ratio_mask, c.search_bn) == (0.002, "sgd", "soft", "batch")
    assert (c.lambda_ce, c.ratio_rows, c.ratio_cap, c.bn_every) == (0.0, "all", 3.0, 7)
    d = build_spec(_args("--dataset", "digits")).pruning.car  # the product defaults (core.spec.CarSpec)
    defaults = (d.lambda_ce, d.ratio_mask, d.ratio_rows, d.ratio_cap, d.mask_lr)
    assert defaults == (1.0, "hard", "correct", 10.0, 0.001)
    assert spec.pruning.amp and not build_spec(_args("--dataset", "digits")).pruning.amp
    assert spec.certification.n == 7 and spec.seed == 4 and spec.sweep_methods is None
    assert [(v.method, v.prune_ratio) for v in spec.variants()] == [("car", 0.7)]
