"""CAR against LMP over several seeds, each its own pretraining: the across-seed view of bench.car_claim.

One seed's table (`bench.car_claim`) has 95 % intervals over its 300 certified samples, but not over
the pretraining and the search, which also change with the seed. Here every seed runs
`bench.car_claim` into `<out>/s<seed>/default` (LMP, CAR with the product defaults, CAR's random-sign
control); each `--variant NAME[@ratios]=key:value,...` runs CAR with those CarSpec overrides on the same
pretrained model (its `pretrained.pt` and vanilla / LMP rows are copied) into `<out>/s<seed>/<NAME>`.
Reported per prune ratio and method: mean accuracy and PCA over the seeds, and the paired PCA
difference to LMP: its mean over seeds with the Student-t 95 % interval of the per-seed differences
(each seed one observation), and the number of seeds in which the method is above LMP; for CAR's
control and variants, the same for their difference to CAR with the defaults. Every other
argument goes to `bench.car_claim` unchanged (cached rows make a stopped run continue).

    python -m bench.car_seeds --seeds 0 1 2 3 4 --ratios 0.5 0.7 0.8 0.9 --out var/seeds-digits \\
        --variant recalibrate@0.5,0.7=search_bn:recalibrate --variant frozen@0.8,0.9=search_bn:frozen
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from bench import car_claim
from bench.car_claim import publish

DEFAULT = "default"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME[@r1,r2,...]=key:value,... CAR with these CarSpec overrides (no control) on each "
        "seed's model, at ratios r1, r2, ... (default: --ratios)",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--machine", default="not stated", help="the machine, for the RESULTS.md section")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to write the section into")
    ap.add_argument("--section", default=None, help="heading of the RESULTS.md section (### ...)")
    a, rest = ap.parse_known_args(argv)
    if any(arg == "--seed" or arg.startswith("--seed=") for arg in rest):
        ap.error("--seed would give every run the same seed: list the seeds with --seeds")
    return a, rest


def _share_pretraining(src: Path, dst: Path) -> None:
    """dst starts from src's pretrained model and its vanilla / LMP rows (same model, same masks)."""
    (dst / "rows").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "pretrained.pt", dst / "pretrained.pt")
    for row in (src / "rows").iterdir():
        if row.name.startswith(("vanilla", "lmp")):
            shutil.copy2(row, dst / "rows" / row.name)


def run_seed(a: argparse.Namespace, rest: list[str], seed: int) -> list[dict]:
    """Every row of one seed, CAR variants named 'car <NAME>'."""
    base = a.out / f"s{seed}" / DEFAULT
    ratios = [str(r) for r in a.ratios]
    car_claim.main([*rest, "--seed", str(seed), "--ratios", *ratios, "--out", str(base)])
    rows = json.loads((base / "claim.json").read_text())["rows"]
    for spec in a.variant:
        head, _, overrides = spec.partition("=")
        name, _, at = head.partition("@")
        out = a.out / f"s{seed}" / name
        _share_pretraining(base, out)
        vratios = [str(float(r)) for r in at.split(",")] if at else ratios
        argv = [*rest, "--seed", str(seed), "--ratios", *vratios, "--no-control", "--car", overrides]
        car_claim.main([*argv, "--out", str(out)])
        for row in json.loads((out / "claim.json").read_text())["rows"]:
            if row["name"] == "car":
                rows.append({**row, "name": f"car {name}"})
    return rows


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of values and its Student-t 95 % interval (nan-wide for a single value)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def _certified(row: dict) -> np.ndarray:
    return np.asarray(row["certified"], dtype=float)


def aggregate(per_seed: dict[int, list[dict]]) -> list[dict]:
    """One entry per (ratio, method) present in every seed: means over seeds, and for methods other
    than LMP the per-seed paired PCA differences to LMP (mean of certified_method - certified_lmp over
    the same samples), their t-interval and how many are > 0."""
    keyed = {s: {(r["ratio"], r["name"]): r for r in rows} for s, rows in per_seed.items()}
    common = set.intersection(*(set(k) for k in keyed.values()))
    out = []
    for ratio, name in sorted(common, key=lambda k: (k[0], k[1] != "lmp", k[1])):
        rows = [keyed[s][(ratio, name)] for s in sorted(keyed)]
        pcas = [float(r["pca"]) for r in rows]
        entry = {
            "ratio": ratio,
            "name": name,
            "seeds": len(rows),
            "accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "pca": float(np.mean(pcas)),
            "pcas": pcas,
            "diffs": None,
        }
        if name not in ("lmp", "vanilla") and all((ratio, "lmp") in keyed[s] for s in keyed):
            entry["diffs"] = [
                float(np.mean(_certified(keyed[s][(ratio, name)]) - _certified(keyed[s][(ratio, "lmp")])))
                for s in sorted(keyed)
            ]
        out.append(entry)
    return out


def _ci(diffs: list[float]) -> str:
    m, lo, hi = t_interval(diffs)
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def render(
    entries: list[dict], seeds: list[int], command: str, setting: str, machine: str = "not stated"
) -> str:
    """The table: for CAR's control and variants ('car <name>') also the per-seed PCA difference to
    CAR with the defaults ('car'), whose per-seed differences to LMP they share the LMP term with."""
    default = {e["ratio"]: e for e in entries if e["name"] == "car"}
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
        f"Setting: {setting}; seeds {', '.join(map(str, seeds))} (each seed: its own pretraining, search "
        "and certification draws).",
        "",
        "| method | pr | accuracy % (mean) | PCA % (mean) | PCA - LMP, mean over seeds [t 95 % CI] "
        "| seeds above LMP | PCA - CAR default [t 95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        diff, above, vs_car = "-", "-", "-"
        if e["diffs"] is not None:
            diff = _ci(e["diffs"])
            above = f"{sum(d > 0 for d in e['diffs'])} / {len(e['diffs'])}"
            car = default.get(e["ratio"])
            if e["name"].startswith("car ") and car is not None and car["diffs"] is not None:
                vs_car = _ci([v - c for v, c in zip(e["diffs"], car["diffs"], strict=True)])
        lines.append(
            f"| {e['name']} | {e['ratio']:.1f} | {100 * e['accuracy']:.1f} | **{100 * e['pca']:.1f}** | "
            f"{diff} | {above} | {vs_car} |"
        )
    return "\n".join(lines + room_lines(entries)) + "\n"


def room_lines(entries: list[dict]) -> list[str]:
    """Per ratio, CAR's per-seed PCA gain over LMP beside the room LMP left in that seed (vanilla PCA -
    LMP PCA, the loss from pruning that there is to win back), in percentage points."""
    by = {(e["ratio"], e["name"]): e for e in entries}
    vanilla = by.get((0.0, "vanilla"))
    out = []
    for (ratio, name), e in by.items():
        lmp = by.get((ratio, "lmp"))
        if name != "car" or e["diffs"] is None or vanilla is None or lmp is None:
            continue
        pairs = zip(e["diffs"], vanilla["pcas"], lmp["pcas"], strict=True)
        cells = ", ".join(f"{100 * d:+.1f} ({100 * (v - m):.1f})" for d, v, m in pairs)
        out.append(f"- pr {ratio:.1f}, CAR - LMP per seed (room vanilla - LMP): {cells}")
    return ["", *out] if out else []


def main(argv: list[str] | None = None) -> int:
    a, rest = parse_args(argv)
    per_seed = {s: run_seed(a, rest, s) for s in a.seeds}
    entries = aggregate(per_seed)
    command = "python -m bench.car_seeds " + shlex.join(argv if argv is not None else sys.argv[1:])
    setting = (
        " ".join(rest)
        or "bench.car_claim defaults (small_cnn, digits, rotation 1.5, epochs 15 / 8 / 4, 300 samples)"
    )
    body = render(entries, a.seeds, command, setting, a.machine)
    payload = {"command": command, "entries": entries}
    publish(a.out / "seeds", payload, body, a.results, a.section or f"CAR over seeds: {setting}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
