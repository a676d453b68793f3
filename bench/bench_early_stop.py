"""Exact early stopping: forward passes (and wall time) saved vs the full run, same decisions.

Trains `--arch` on digits (optionally resized to `--size` pixels and repeated to 3 channels, e.g.
resnet18 at 32x32) for `--epochs` with seed 0, then certifies the first `--samples` test samples
four ways per bound setting: full and --early-stop, for cccert (the METHOD.md defaults) and for
binomial (beta 1e-3, at epsilon 1e-2 where N = 1000 can certify, and at 1e-3 where it cannot).
Checks that early stopping gives the full run's decisions and PCA, and prints a markdown table:
forward passes (clean + transformed model evaluations, a count independent of the machine) and
seconds (wall time: meaningful only on a quiet machine).

    .venv/bin/python bench/bench_early_stop.py [--arch small_cnn --size 8 --epochs 3 --samples 100 \\
        --transform illumination --device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.certify import certify_model  # noqa: E402
from core.data import load_dataset  # noqa: E402
from core.models import build_model  # noqa: E402
from core.spec import CertifySpec  # noqa: E402
from core.transforms import ParametricTransform  # noqa: E402

SETTINGS = (
    ("cccert", {"bound": "cccert"}),
    ("binomial eps 1e-2", {"bound": "binomial", "epsilon": 1e-2}),
    ("binomial eps 1e-3", {"bound": "binomial", "epsilon": 1e-3}),
)


def _data(size: int, channels: int):
    data = load_dataset("digits", seed=0)

    def prep(x: torch.Tensor) -> torch.Tensor:
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, channels, 1, 1)

    return prep(data.train_x), data.train_y, prep(data.test_x), data.test_y


def _train(arch: str, xs, ys, epochs: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 10, xs.shape[1], small_input=True).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(xs.shape[0], generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(xs[b].to(device)), ys[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--size", type=int, default=8, help="image side (digits are 8x8; 32 = resized)")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--transform", default="illumination")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    trx, try_, tex, tey = _data(args.size, args.channels)
    model = _train(args.arch, trx, try_, args.epochs, args.device)
    transform = ParametricTransform(args.transform)
    rows = []
    print(f"{args.arch} {args.channels}x{args.size}x{args.size}, {args.epochs} epochs, {args.transform}, "
          f"{args.samples} samples, n 100, l 10, device {args.device}")
    print("| bound | PCA | accuracy | forward passes full | early stop | saved | seconds full | early stop |")
    print("|---|---|---|---|---|---|---|---|")
    for name, update in SETTINGS:
        spec = CertifySpec(samples=args.samples, batch_size=args.batch_size, **update)
        out = {}
        for early in (False, True):
            s = spec.model_copy(update={"early_stop": early})
            out[early] = certify_model(model, tex, tey, transform, s, seed=0, device=args.device)
        full, fast = out[False], out[True]
        assert [r["certified"] for r in full.samples] == [r["certified"] for r in fast.samples], name
        assert full.pca == fast.pca
        saved = 1 - fast.forward_passes / full.forward_passes
        row = {"bound": name, "pca": full.pca, "accuracy": full.accuracy, "forward_full": full.forward_passes,
               "forward_early": fast.forward_passes, "saved": saved, "seconds_full": full.seconds,
               "seconds_early": fast.seconds}
        rows.append(row)
        print(f"| {name} | {full.pca:.2f} | {full.accuracy:.2f} | {full.forward_passes} | "
              f"{fast.forward_passes} | {saved:.1%} | {full.seconds:.1f} | {fast.seconds:.1f} |")
    if args.json:
        meta = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"args": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
