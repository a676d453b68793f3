"""bench/car_seeds.py: the across-seed aggregation against independent computations, and one tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from bench import car_seeds
from bench.car_seeds import aggregate, main, render, t_interval


def _row(name: str, ratio: float, certified: list[int], acc: float = 0.9) -> dict:
    return {
        "name": name,
        "ratio": ratio,
        "certified": certified,
        "pca": float(np.mean(certified)),
        "accuracy": acc,
    }


def test_t_interval_is_scipys_one_sample_interval() -> None:
    values = [0.12, 0.031, 0.2, -0.04, 0.09]
    m, lo, hi = t_interval(values)
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert m == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert np.isnan(t_interval([0.3])[1])


def test_aggregate_pairs_each_seed_with_its_own_lmp() -> None:
    rng = np.random.default_rng(0)
    per_seed, want = {}, []
    for seed in range(4):
        lmp = rng.integers(0, 2, 30).astype(bool).tolist()  # stored as car_claim stores them
        car = rng.integers(0, 2, 30).astype(bool).tolist()
        per_seed[seed] = [_row("lmp", 0.7, lmp, 0.8), _row("car", 0.7, car, 0.85 + seed / 100)]
        want.append(sum(int(c) - int(m) for c, m in zip(car, lmp, strict=True)) / 30)
    per_seed[2].append(_row("car frozen", 0.7, [1] * 30))  # not in every seed: left out
    entries = aggregate(per_seed)
    assert [(e["name"], e["ratio"]) for e in entries] == [("lmp", 0.7), ("car", 0.7)]
    lmp, car = entries
    assert lmp["diffs"] is None and lmp["seeds"] == 4
    assert car["diffs"] == pytest.approx(want)
    assert car["accuracy"] == pytest.approx(np.mean([0.85, 0.86, 0.87, 0.88]))


def test_a_tiny_run_shares_each_seeds_pretraining_with_its_variant(tmp_path) -> None:
    out = tmp_path / "seeds"
    args = [
        "--seeds",
        "0",
        "1",
        "--ratios",
        "0.5",
        "--out",
        str(out),
        "--variant",
        "frozen@0.5=search_bn:frozen",
    ]
    tiny = ["--pretrain-epochs", "1", "--search-epochs", "1", "--finetune-epochs", "1", "--augment-q", "32"]
    tiny += ["--samples", "6", "--n", "8", "--l", "2", "--threads", "1", "--no-control"]
    assert main(args + tiny) == 0
    for seed in (0, 1):
        default, variant = out / f"s{seed}" / "default", out / f"s{seed}" / "frozen"
        assert (default / "pretrained.pt").read_bytes() == (variant / "pretrained.pt").read_bytes()
        assert (default / "rows" / "lmp-0.5.json").read_text() == (
            variant / "rows" / "lmp-0.5.json"
        ).read_text()
        # search_bn auto at pr 0.5 is frozen: the variant is the default, run again, deterministically
        car = json.loads((default / "rows" / "car-0.5.json").read_text())
        again = json.loads((variant / "rows" / "car-0.5.json").read_text())
        assert car["certified"] == again["certified"] and car["accuracy"] == again["accuracy"]
    assert (out / "s0" / "default" / "pretrained.pt").read_bytes() != (
        out / "s1" / "default" / "pretrained.pt"
    ).read_bytes()
    summary = json.loads((out / "seeds.json").read_text())["entries"]
    assert {(e["name"], e["ratio"]) for e in summary} == {
        ("vanilla", 0.0),
        ("lmp", 0.5),
        ("car", 0.5),
        ("car frozen", 0.5),
    }
    assert "| car frozen | 0.5 |" in (out / "seeds.md").read_text()


def test_render_compares_variants_with_the_default_seed_by_seed() -> None:
    rng = np.random.default_rng(1)
    per_seed, gaps = {}, []
    for seed in range(5):
        lmp, car, frozen = (rng.integers(0, 2, 40).astype(bool).tolist() for _ in range(3))
        per_seed[seed] = [_row("lmp", 0.9, lmp), _row("car", 0.9, car), _row("car frozen", 0.9, frozen)]
        gaps.append(np.mean(np.array(frozen, float) - np.array(car, float)))
    ci = stats.ttest_1samp(gaps, 0.0).confidence_interval(0.95)
    want = f"{100 * np.mean(gaps):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] |"
    table = render(aggregate(per_seed), list(range(5)), "cmd", "setting")
    (frozen_line,) = [line for line in table.splitlines() if line.startswith("| car frozen |")]
    assert frozen_line.endswith(want)
    (car_line,) = [line for line in table.splitlines() if line.startswith("| car |")]
    assert car_line.endswith("| - |")


def test_a_single_seed_among_the_car_claim_arguments_is_refused(capsys) -> None:
    """--seed would be passed to every run (or, abbreviated, read as --seeds): a clear error instead."""
    for argv in (["--seed", "3"], ["--seed=3"]):
        with pytest.raises(SystemExit) as exc:
            car_seeds.parse_args([*argv, "--out", "x"])
        assert exc.value.code == 2
        assert "--seeds" in capsys.readouterr().err
    a, rest = car_seeds.parse_args(["--seeds", "1", "2", "--out", "x", "--arch", "resnet18"])
    assert a.seeds == [1, 2] and rest == ["--arch", "resnet18"]


def test_render_lists_each_seeds_gain_beside_the_room_lmp_left() -> None:
    """room = vanilla PCA - LMP PCA of the same seed; the gain is CAR - LMP on the same samples."""
    certified = {0: ([1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]), 1: ([1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0])}
    per_seed = {
        s: [_row("vanilla", 0.0, v), _row("lmp", 0.7, m), _row("car", 0.7, c)]
        for s, (v, m, c) in certified.items()
    }
    table = render(aggregate(per_seed), [0, 1], "cmd", "setting")
    assert "- pr 0.7, CAR - LMP per seed (room vanilla - LMP): +25.0 (75.0), -25.0 (0.0)" in table
