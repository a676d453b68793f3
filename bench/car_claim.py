"""CAR against LMP and against CAR's own random-sign control, certified, with 95 % intervals.

One pretrained model (cached in `<out>/pretrained.pt`) is pruned at every ratio by LMP, by CAR with
the product's defaults (plus `--car` overrides) and by the same CAR whose every search step uses
random gradient signs (`CarSpec.control = "random_sign"`), all through `core.baselines.run_method`
(search, binarize, BatchNorm re-estimation, fine-tune, as a job runs them). Each model is certified
with CC-Cert (`core.certify.certify_model`, METHOD.md defaults unless given) on the first
`--samples` test samples. Reported: test accuracy on the whole test split and PCA, each with its
Wilson 95 % interval, and the paired PCA difference to LMP on the same samples with its 95 %
interval (normal approximation on the per-sample differences, which are -1, 0 or 1).

    python -m bench.car_claim --arch small_cnn --dataset digits --transform rotation --strength 1.5 \\
        --out var/claim-digits --results bench/RESULTS.md --section "CAR claim: small_cnn, digits"
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.car_diagnostics import cached_pretrained, car_spec, overlap, parse_variant
from core.baselines import run_method
from core.certify import certify_model
from core.data import load_dataset
from core.spec import CarSpec, CertifySpec, PruningSpec, TransformSpec
from core.training import evaluate
from core.transforms import build_transform

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + Z95**2 / n
    mid = (p + Z95**2 / (2 * n)) / den
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def paired_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of a - b (0/1 per sample, same samples) and its normal-approximation 95 % interval."""
    d = a.astype(float) - b.astype(float)
    m = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 1.0
    return m, m - Z95 * se, m + Z95 * se


class _RowCache:
    """The rows scored so far, one JSON file each under <out>/rows/ (with the pruned mask), so a run
    stopped part-way continues where it stopped when started again with the same arguments."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, ratio: float, suffix: str) -> Path:
        return self.dir / f"{name.replace(' ', '_')}-{ratio:g}{suffix}"

    def get(self, name: str, ratio: float) -> dict | None:
        path = self._path(name, ratio, ".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def mask(self, name: str, ratio: float) -> dict | None:
        path = self._path(name, ratio, ".pt")
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def put(self, row: dict, mask: dict | None) -> dict:
        if mask is not None:
            torch.save(mask, self._path(row["name"], row["ratio"], ".pt"))
        self._path(row["name"], row["ratio"], ".json").write_text(json.dumps(row))
        return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--transform", default="rotation")
    ap.add_argument("--strength", type=float, default=1.5)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--augment-q", type=int, default=1000)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument(
        "--car",
        default="",
        help="CarSpec overrides key:value,... on top of the product defaults "
        "(with preset:paper on top of Eq. 9 as published)",
    )
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--l", type=int, default=10)
    ap.add_argument(
        "--full-sampling",
        action="store_true",
        help="sample every transformation (default: exact early stop, same decisions, fewer forwards)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to write the section into")
    ap.add_argument("--section", default=None, help="heading of the RESULTS.md section (## ...)")
    return ap.parse_args(argv)


def update_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the `### heading` section of RESULTS.md."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"### {heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^### {re.escape(heading)}\n.*?(?=^##|\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: block + "\n", text, count=1)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block
    )
    path.write_text(text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_dataset(a.dataset, seed=a.seed, train_subset=a.train_subset)
    tspec = TransformSpec(name=a.transform, strength=a.strength)
    t_train = build_transform(tspec, data=data, split="train")
    t_test = build_transform(tspec, data=data, split="test")
    car = car_spec(parse_variant("car=" + a.car)[1])
    base_spec = PruningSpec(
        pretrain_epochs=a.pretrain_epochs,
        search_epochs=a.search_epochs,
        finetune_epochs=a.finetune_epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        augment_q=a.augment_q,
        car=car,
    )
    cert = CertifySpec(n=a.n, l=a.l, samples=a.samples, early_stop=not a.full_sampling)
    base = cached_pretrained(a.arch, data, t_train, base_spec, a.seed, a.out / "pretrained.pt")

    def score(name: str, ratio: float, model, mask, lmp_mask, seconds: float) -> dict:
        res = certify_model(copy.deepcopy(model), data.test_x, data.test_y, t_test, cert, seed=a.seed)
        certified = np.array([s["certified"] for s in res.samples])
        acc = evaluate(model, data.test_x, data.test_y)
        row = {
            "name": name,
            "ratio": ratio,
            "accuracy": acc,
            "n_test": len(data.test_y),
            "pca": float(certified.mean()),
            "certified": certified.tolist(),
            "overlap_lmp": overlap(mask, lmp_mask) if mask is not None and lmp_mask is not None else None,
            "seconds": seconds,
        }
        print(name, ratio, f"acc {acc:.3f} pca {row['pca']:.3f}", flush=True)
        return row

    done = _RowCache(a.out)
    rows = [done.get("vanilla", 0.0) or done.put(score("vanilla", 0.0, base, None, None, 0.0), None)]
    methods = [("lmp", "lmp", car), ("car", "car", car)]
    if not a.no_control:
        methods.append(("car control", "car", car.model_copy(update={"control": "random_sign"})))
    for ratio in a.ratios:
        lmp_mask = None
        for name, method, c in methods:
            if (row := done.get(name, ratio)) is None:
                model = copy.deepcopy(base)
                spec = base_spec.model_copy(
                    update={"method": method, "prune_ratio": ratio, "pretrain_epochs": 0, "car": c}
                )
                t0 = time.perf_counter()
                mask = run_method(method, model, data, t_train, spec, seed=a.seed)
                lmp_mask = mask if method == "lmp" else lmp_mask
                row = done.put(score(name, ratio, model, mask, lmp_mask, time.perf_counter() - t0), mask)
            elif method == "lmp":  # scored by an earlier run: its mask, for the overlaps
                lmp_mask = done.mask("lmp", ratio)
            rows.append(row)
    command = "python -m bench.car_claim " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = render(a, rows, command, time.perf_counter() - started, car)
    publish(
        a.out / "claim",
        {"command": command, "rows": rows},
        body,
        a.results,
        a.section or f"CAR claim: {a.arch}, {a.dataset}",
    )
    return 0


def publish(stem: Path, payload: dict, body: str, results: Path | None, heading: str) -> None:
    """<stem>.json (the numbers), <stem>.md (the table), printed, and the `### heading` section of
    `results` when given."""
    stem.with_suffix(".json").write_text(json.dumps(payload))
    stem.with_suffix(".md").write_text(body)
    print(body)
    if results is not None:
        update_section(results, heading, body)


def render(a: argparse.Namespace, rows: list[dict], command: str, seconds: float, car: CarSpec) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    lines = [
        f"Command: `{command}` ({seconds / 60:.1f} min on 2 shared cores)",
        "",
        f"Setting: {a.arch} on {a.dataset} (train subset {a.train_subset or 'all'}), {a.transform} "
        f"strength {a.strength}, "
        f"q = {a.augment_q}; epochs pretrain {a.pretrain_epochs} / search {a.search_epochs} / fine-tune "
        f"{a.finetune_epochs}; CAR {car.model_dump(exclude_defaults=True) or 'product defaults'}; "
        f"CC-Cert n {a.n}, l {a.l}, alpha 0.9, epsilon 1e-3 on the first {a.samples} test samples "
        f"({'every transformation sampled' if a.full_sampling else 'exact early stop: same decisions'}).",
        "",
        "| method | pr | accuracy % [95 % CI] | PCA % [95 % CI] | PCA - LMP (paired) [95 % CI] "
        "| overlap with LMP |",
        "|---|---|---|---|---|---|",
    ]
    lmp = {r["ratio"]: np.array(r["certified"]) for r in rows if r["name"] == "lmp"}
    for r in rows:
        c = np.array(r["certified"])
        k_acc = round(r["accuracy"] * r["n_test"])
        lo, hi = wilson(k_acc, r["n_test"])
        plo, phi = wilson(int(c.sum()), len(c))
        diff = "-"
        if r["ratio"] in lmp and r["name"] != "lmp":
            m, dlo, dhi = paired_diff(c, lmp[r["ratio"]])
            diff = f"{100 * m:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
        ov = "-" if r["overlap_lmp"] is None else f"{r['overlap_lmp']:.3f}"
        lines.append(
            f"| {r['name']} | {r['ratio']:.1f} | {pct(r['accuracy'])} [{pct(lo)}, {pct(hi)}] | "
            f"**{pct(r['pca'])}** [{pct(plo)}, {pct(phi)}] | {diff} | {ov} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
