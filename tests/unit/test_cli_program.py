"""`carcert prune --model net.pt2` / `carcert certify --model`: networks no registry knows, exported
with torch.export, pruned with lmp, hydra and car, certified, verified; the pruned .pt2 runs with
torch alone and has the reported sparsity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carcert.cli import main
from core.certify import verify_certificate
from core.data import load_dataset
from core.models import file_sha256, weights_metadata
from tests.programs import TwoHeadGroupNet, export, torchvision_new_head

TINY = [
    "--dataset",
    "digits",
    "--transform",
    "brightness",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--train-subset",
    "200",
    "--augment-q",
    "20",
    "--n",
    "10",
    "--l",
    "2",
    "--samples",
    "4",
    "--t-steps",
    "20",
    "--device",
    "cpu",
    "--quiet",
]

LOAD_ALONE = """
import sys, torch
x, y = (torch.load(sys.argv[i], weights_only=True) for i in (1, 2))
names = sys.argv[3].split(",")
for path in sys.argv[4:]:
    m = torch.export.load(path).module()
    sd = m.state_dict()
    nonzero = sum(int(torch.count_nonzero(sd[n])) for n in names)
    print(nonzero, float(m(x).argmax(1).eq(y).float().mean()))
assert not [k for k in sys.modules if k.split(".")[0] in ("core", "carcert", "tests")]
"""


def load_alone(pt2s: list[Path], names: list[str], tmp: Path) -> list[tuple[int, float]]:
    """Run each .pt2 in a fresh isolated interpreter that imports torch only: (nonzero prunable
    weights, accuracy on the digits test split) per file."""
    data = load_dataset("digits", seed=0)
    torch.save(data.test_x, tmp / "x.pt")
    torch.save(data.test_y, tmp / "y.pt")
    argv = [str(tmp / "x.pt"), str(tmp / "y.pt"), ",".join(names), *map(str, pt2s)]
    out = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_ALONE, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return [(int(a), float(b)) for a, b in (line.split() for line in out.stdout.splitlines())]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_prune_program_lmp_hydra_car(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(1)
    net = export(TwoHeadGroupNet(), tmp_path / "net.pt2", mode)
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "--model",
                str(net),
                "--method",
                "lmp,hydra,car",
                "--prune-ratio",
                "0.5",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    expected = ["stem.weight", "grouped.weight", "depthwise.weight", "head_a.weight", "head_b.weight"]
    folders = [out / f"{method}-0.50" for method in ("lmp", "hydra", "car")]
    alone = load_alone([f / "model.pt2" for f in folders], expected, tmp_path)
    for folder, (nonzero, acc) in zip(folders, alone, strict=True):
        metrics = json.loads((folder / "metrics.json").read_text())
        cert = json.loads((folder / "certificate.json").read_text())
        assert metrics["arch"] == "program" and [e["name"] for e in metrics["layers"]] == expected
        assert metrics["program_sha256"] == file_sha256(net) == cert["model"]["program_sha256"]
        assert cert["model"]["pt2_sha256"] == file_sha256(folder / "model.pt2")
        assert weights_metadata(folder / "mask.safetensors")["program_sha256"] == file_sha256(net)
        assert verify_certificate(folder / "certificate.json") == []
        assert cert["model"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert nonzero == metrics["nonzero"] == cert["model"]["nonzero"]
        assert acc == pytest.approx(metrics["accuracy"], abs=1e-9)


def test_certify_program_and_its_pruned_output(tmp_path: Path, capsys) -> None:
    net = export(torchvision_new_head(), tmp_path / "mnv3.pt2", "eval")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "--model",
                str(net),
                "--method",
                "lmp",
                "--prune-ratio",
                "0.3",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    cert = json.loads((out / "certificate.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.3, abs=0.01) and len(metrics["layers"]) > 30
    # certify the pruned program alone, and the input program + pruned weights + mask: same model
    common = [
        "--dataset",
        "digits",
        "--transform",
        "brightness",
        "--n",
        "10",
        "--l",
        "2",
        "--samples",
        "4",
        "--t-steps",
        "20",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert (
        main(["certify", "--model", str(out / "model.pt2"), *common, "--out", str(tmp_path / "a.json")]) == 0
    )
    assert (
        main(
            [
                "certify",
                "--model",
                str(net),
                "--weights",
                str(out / "model.safetensors"),
                "--mask",
                str(out / "mask.safetensors"),
                *common,
                "--out",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    for c in (a, b):
        assert verify_certificate(tmp_path / (("a" if c is a else "b") + ".json")) == []
        assert c["model"]["arch"] == "program" and c["model"]["nonzero"] == metrics["nonzero"]
    assert a["model"]["program_sha256"] == file_sha256(out / "model.pt2")
    assert b["model"]["program_sha256"] == file_sha256(net) and b["mask_sha256"] == cert["mask_sha256"]
    assert (
        [s["pred"] for s in a["samples"]]
        == [s["pred"] for s in b["samples"]]
        == [s["pred"] for s in cert["samples"]]
    )
