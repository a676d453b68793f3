"""CAR mask-search diagnostics: CAR variants against LMP on one shared pretrained model.

The Table 1 setting at small scale (bench/table1.py's defaults) is pretrained once (cached in
`<out>/pretrained.pt`), then LMP and each CAR variant (CarSpec overrides) prune it at every ratio
through the product's own code (`core.baselines.run_method` with pretrain_epochs 0: search,
binarize, BatchNorm re-estimation, fine-tune). Each is scored by test accuracy (whole test split),
a PCA proxy on the first `--eval-samples` test samples (correct and max Z over an 11-point delta grid
below the margin d: what CC-Cert at epsilon = 1e-3 certifies up to sampling) and the overlap of its
kept weights with LMP's. A markdown table goes to stdout and `<out>/diagnostics.md`.

    python -m bench.car_diagnostics --out var/car-diag \\
        --variant as-is= --variant sgd=mask_optimizer:sgd,mask_lr:0.1
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.table1 import build_spec, proxy_pca
from bench.table1 import parse_args as table1_args
from core.baselines import run_method
from core.data import load_dataset
from core.models import build_model, default_small_input
from core.spec import CarSpec, PruningSpec
from core.training import evaluate
from core.transforms import build_transform


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """'name=key:value,key:value' -> (name, CarSpec overrides); values parsed as float where they
    can, 'none' as None (e.g. ratio_cap:none)."""
    name, _, body = text.partition("=")
    out: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition(":")
        try:
            out[k] = None if v.lower() == "none" else float(v)
        except ValueError:
            out[k] = v
    return name, out


def car_spec(overrides: dict[str, object]) -> CarSpec:
    """CarSpec from variant overrides on top of the product defaults, or on top of the paper's Eq. 9
    as published with the key `preset:paper` (CarSpec.published)."""
    over = dict(overrides)
    preset = over.pop("preset", "default")
    if preset not in ("default", "paper"):
        raise ValueError(f"preset must be default or paper, got {preset!r}")
    return CarSpec.published(**over) if preset == "paper" else CarSpec(**over)


def cached_pretrained(
    arch: str, data, transform, spec: PruningSpec, seed: int, cache: Path
) -> torch.nn.Module:
    """The shared pretrained model of a CAR benchmark: loaded from `cache` when present, else
    trained as the product's vanilla method with `spec` (seeded) and saved there."""
    torch.manual_seed(seed)
    model = build_model(
        arch, data.num_classes, data.in_channels, small_input=default_small_input(*data.train_x.shape[2:])
    )
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model
    run_method("vanilla", model, data, transform, spec.model_copy(update={"method": "vanilla"}), seed=seed)
    torch.save(model.state_dict(), cache)
    return model


def overlap(mask: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Fraction of the weights kept by `mask` that `ref` keeps too."""
    both = sum(int((mask[n] & ref[n]).sum()) for n in mask)
    kept = sum(int(mask[n].sum()) for n in mask)
    return both / max(1, kept)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="name=key:value,... (CarSpec overrides)")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--no-lmp", action="store_true")
    own, rest = ap.parse_known_args(argv)
    a = table1_args(rest)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    spec = build_spec(a)
    data = load_dataset(a.dataset, seed=a.seed, train_subset=a.train_subset)
    train_t = build_transform(spec.transform, data=data, split="train")
    test_t = build_transform(spec.transform, data=data, split="test")
    xs, ys = data.test_x[: own.eval_samples], data.test_y[: own.eval_samples]

    base = cached_pretrained(a.arch, data, train_t, spec.pruning, a.seed, a.out / "pretrained.pt")

    def row(name: str, ratio: float, model: torch.nn.Module, ov: float, sec: float) -> tuple:
        acc = evaluate(model, data.test_x, data.test_y)
        return name, ratio, acc, proxy_pca(model, xs, ys, test_t), ov, sec

    rows = [row("vanilla", 0.0, base, float("nan"), 0.0)]

    def prune(method: str, ratio: float, car: dict[str, object]) -> tuple[object, dict, float]:
        model = copy.deepcopy(base)
        p = spec.pruning.model_copy(
            update={
                "method": method,
                "prune_ratio": ratio,
                "pretrain_epochs": 0,
                "car": car_spec({**spec.pruning.car.model_dump(exclude_defaults=True), **car}),
            }
        )
        t0 = time.perf_counter()
        mask = run_method(method, model, data, train_t, p, seed=a.seed)
        return model, mask, time.perf_counter() - t0

    for ratio in a.ratios:
        model, lmp_mask, sec = prune("lmp", ratio, {})
        if not own.no_lmp:
            rows.append(row("lmp", ratio, model, 1.0, sec))
            print(rows[-1], flush=True)
        for text in own.variant:
            name, car = parse_variant(text)
            model, mask, sec = prune("car", ratio, car)
            rows.append(row(f"car {name}", ratio, model, overlap(mask, lmp_mask), sec))
            print(rows[-1], flush=True)

    lines = [
        "Command: `python -m bench.car_diagnostics "
        + shlex.join(argv if argv is not None else sys.argv[1:])
        + "`",
        "",
        f"| variant | prune ratio | accuracy (test) | PCA~ ({len(xs)} samples) | overlap with LMP | s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {r:.2f} | {acc:.3f} | {pca:.3f} | {ov:.3f} | {s:.0f} |"
            for n, r, acc, pca, ov, s in rows
        ),
    ]
    body = "\n".join(lines) + "\n"
    (a.out / "diagnostics.md").write_text(body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
