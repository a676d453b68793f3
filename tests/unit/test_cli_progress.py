"""carcert.progress: the variant label and the ETA `carcert submit --wait` shows."""

from __future__ import annotations

import pytest

from carcert.progress import EtaClock, eta_seconds, format_eta, variant_label


def test_variant_label_names_running_units_or_the_only_variant() -> None:
    units = [{"name": "car-0.50", "status": "succeeded"}, {"name": "car-0.70", "status": "running"},
             {"name": "lmp-0.50", "status": "running"}, {"name": "lmp-0.70", "status": "queued"}]
    assert variant_label({"units": units}) == "car-0.70,lmp-0.50 (1/4 done)"
    assert variant_label({"units": [{"name": "a", "status": "queued"}]}) == "- (0/1 done)"
    one = {"kind": "prune", "pruning": {"method": "car", "prune_ratio": 0.7}}
    assert variant_label({"spec": one}) == "car-0.70"
    vanilla = {**one, "pruning": {"method": "vanilla", "prune_ratio": 0.7}}
    assert variant_label({"spec": vanilla}) == "vanilla-0.00"
    assert variant_label({"spec": {**one, "sweep_methods": ["car", "lmp"]}}) == ""  # not spread: unknown
    assert variant_label({"spec": {"kind": "certify"}}) == "certify"


def test_eta_from_the_rate_since_first_seen() -> None:
    assert eta_seconds(10.0, 0.2, 0.4) == pytest.approx(10.0 * 0.6 / 0.2)
    assert eta_seconds(10.0, 0.4, 0.4) is None and eta_seconds(0.0, 0.0, 0.5) is None
    assert eta_seconds(5.0, 0.1, 1.0) == 0.0
    assert [format_eta(s) for s in (None, 12.4, 187, 3720)] == ["ETA ?", "ETA 12s", "ETA 3m07s", "ETA 1h02m"]


def test_clock_measures_from_the_first_running_poll() -> None:
    t = [100.0]
    clock = EtaClock(now=lambda: t[0])
    job = {"status": "running", "progress": 0.25, "units": [{"name": "car-0.50", "status": "running"}]}
    assert clock.text(job) == "car-0.50 (0/1 done) ETA ?"
    t[0] = 130.0  # 30 s for 0.25 -> 0.5: 0.5 left at that rate is 60 s
    assert clock.text({**job, "progress": 0.5}) == "car-0.50 (0/1 done) ETA 1m00s"
    assert clock.text({"status": "queued", "progress": 0.0}) == ""
