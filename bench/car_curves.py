"""The decisive CAR experiment: mask-search curves against their random-sign controls and LMP.

One pretrained model (cached in `<out>/pretrained.pt`), a fixed fit set F (the first `--fit` original
training images, no augmentation rows). For every prune ratio and every variant (CarSpec overrides),
`core.car.search_mask` runs on F for `--epochs` epochs, and every `--every` steps the binarized mask
(top-k of |m|, ties by |theta|, as `run_car` binarizes) is scored *without fine-tuning*, BatchNorm
statistics re-estimated on F (as `prune_and_finetune` does before it fine-tunes):

- accuracy and the PCA proxy (`bench.table1.proxy_pca`: correct and max Z over an 11-point delta
  grid below the margin d) on F and on the held-out test split;
- the overlap of the kept weights with LMP's mask (top-k of |theta|, the search's starting point);
- L_ratio (Eq. 6-7) of the binarized network on F.

Each variant also runs as its control: the same search with every step's gradient replaced by the
same magnitudes with random signs (`CarSpec.control = "random_sign"`). A search that does not beat
its own control on F carries no signal; one that beats it on F but not on test generalises badly.
Curves go to `<out>/curves.json` and `<out>/curves.png`, the last point of each to stdout.

    python -m bench.car_curves --out var/car-curves --variant paper=preset:paper \\
        --variant default=
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.car_diagnostics import cached_pretrained, car_spec, overlap, parse_variant
from bench.table1 import proxy_pca
from core.car import ratio_loss, search_mask
from core.data import load_dataset
from core.masking import apply_masks_, prunable_weights, topk_mask
from core.spec import CarSpec, PruningSpec, TransformSpec
from core.training import evaluate, recalibrate_batchnorm
from core.transforms import build_transform

METRICS = ("fit_acc", "fit_pca", "test_acc", "test_pca", "overlap_lmp", "fit_ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--transform", default="rotation")
    ap.add_argument("--strength", type=float, default=1.5)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--fit", type=int, default=512, help="size of the fit set F (original training rows)")
    ap.add_argument("--test-samples", type=int, default=1000, help="held-out samples scored")
    ap.add_argument("--epochs", type=int, default=100, help="search epochs over F (the paper's 100)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--every", type=int, default=25, help="score the binarized mask every N steps")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--variant", action="append", default=[], help="name=key:value,... (CarSpec overrides)")
    ap.add_argument("--no-control", action="store_true", help="skip the random-sign controls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


class Scorer:
    """Scores a hard mask on F and on the test samples (BatchNorm re-estimated on F, no fine-tune)."""

    def __init__(self, base, fit, test, transform_fit, transform_test, lmp):
        self.base, self.fit, self.test = base, fit, test
        self.t_fit, self.t_test, self.lmp = transform_fit, transform_test, lmp

    def __call__(self, hard: dict[str, torch.Tensor]) -> dict[str, float]:
        net = copy.deepcopy(self.base)
        apply_masks_(net, hard)
        (xf, yf), (xt, yt) = self.fit, self.test
        recalibrate_batchnorm(net, xf)
        net.eval()
        with torch.no_grad():
            p = F.softmax(net(xf), -1)
            p_t = F.softmax(net(self.t_fit(xf, torch.ones(len(xf)), index=torch.arange(len(xf)))), -1)
            lr = float(ratio_loss(p, p_t, 1.0))
        return {
            "fit_acc": evaluate(net, xf, yf),
            "fit_pca": proxy_pca(net, xf, yf, self.t_fit),
            "test_acc": evaluate(net, xt, yt),
            "test_pca": proxy_pca(net, xt, yt, self.t_test),
            "overlap_lmp": overlap(hard, self.lmp) if self.lmp is not None else 1.0,
            "fit_ratio": lr,
        }


def run_curve(a, base, fit, transform, car: CarSpec, ratio: float, score: Scorer) -> list[dict]:
    """search_mask on F with `car`; the scored binarized mask at step 0 and every a.every steps."""
    weights = prunable_weights(base)
    points = [{"step": 0, **score(topk_mask(weights, ratio, tiebreak=weights))}]

    def on_step(step: int, scores) -> None:
        if step % a.every == 0:
            points.append({"step": step, **score(topk_mask(scores, ratio, tiebreak=weights))})

    model = copy.deepcopy(base)
    search_mask(
        model,
        fit[0],
        fit[1],
        transform,
        car,
        prune_ratio=ratio,
        epochs=a.epochs,
        batch_size=a.batch_size,
        seed=a.seed,
        on_step=on_step,
    )
    return points


def plot(curves: dict, lmp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({c["ratio"] for c in curves.values()})
    fig, axes = plt.subplots(
        len(ratios), len(METRICS), figsize=(3.2 * len(METRICS), 2.8 * len(ratios)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({c["variant"] for c in curves.values()})
    for r_i, ratio in enumerate(ratios):
        for m_i, metric in enumerate(METRICS):
            ax = axes[r_i][m_i]
            for c in curves.values():
                if c["ratio"] != ratio:
                    continue
                color = colors[names.index(c["variant"]) % len(colors)]
                style = "--" if c["control"] else "-"
                label = c["variant"] + (" (control)" if c["control"] else "")
                ax.plot(
                    [p["step"] for p in c["points"]],
                    [p[metric] for p in c["points"]],
                    style,
                    color=color,
                    label=label,
                )
            ax.axhline(lmp[str(ratio)][metric], color="black", lw=0.8, ls=":", label="LMP")
            ax.set_title(f"pr {ratio}: {metric}", fontsize=9)
            ax.set_xlabel("search step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(a.dataset, seed=a.seed, train_subset=a.train_subset)
    tspec = TransformSpec(name=a.transform, strength=a.strength)
    t_train = build_transform(tspec, data=data, split="train")
    t_test = build_transform(tspec, data=data, split="test")
    spec = PruningSpec(pretrain_epochs=a.pretrain_epochs, lr=a.lr, batch_size=a.batch_size)
    base = cached_pretrained(a.arch, data, t_train, spec, a.seed, a.out / "pretrained.pt").eval()
    fit = (data.train_x[: a.fit], data.train_y[: a.fit])
    test = (data.test_x[: a.test_samples], data.test_y[: a.test_samples])
    weights = prunable_weights(base)
    variants = [parse_variant(v) for v in a.variant] or [("paper", {})]
    curves: dict[str, dict] = {}
    lmp: dict[str, dict] = {}
    for ratio in a.ratios:
        lmp_mask = topk_mask(weights, ratio)
        score = Scorer(base, fit, test, t_train, t_test, lmp_mask)
        lmp[str(ratio)] = score(lmp_mask)
        print(f"pr {ratio} LMP {lmp[str(ratio)]}", flush=True)
        for name, overrides in variants:
            for control in [False] if a.no_control else [False, True]:
                car = car_spec({**overrides, "control": "random_sign" if control else "none"})
                t0 = time.perf_counter()
                points = run_curve(a, base, fit, t_train, car, ratio, score)
                key = f"{name}{' control' if control else ''} @ {ratio}"
                curves[key] = {
                    "variant": name,
                    "control": control,
                    "ratio": ratio,
                    "car": overrides,
                    "points": points,
                }
                print(key, f"{time.perf_counter() - t0:.0f} s", points[-1], flush=True)
    command = "python -m bench.car_curves " + shlex.join(argv if argv is not None else sys.argv[1:])
    (a.out / "curves.json").write_text(
        json.dumps({"command": command, "lmp": lmp, "curves": curves}, indent=1)
    )
    plot(curves, lmp, a.out / "curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
