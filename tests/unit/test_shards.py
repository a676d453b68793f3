"""core.shards: a certification split into 1, 2, 3 (and uneven) shards merges into the same
certificate body and the same evidence bytes as the single run; ranges tile the samples on group
boundaries; merging refuses gaps, overlaps and shards of different runs; partials round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.certify import (
    build_certificate,
    certificate_body,
    certify_model,
    verify_certificate,
    write_certificate,
)
from core.errors import InvalidInput
from core.models import build_model
from core.shards import (
    load_partial,
    merge_results,
    save_partial,
    shard_alignment,
    shard_count,
    shard_ranges,
)
from core.spec import CertifySpec
from core.transforms import SemanticTransform
from tests.unit.helpers import one_thread  # noqa: F401 - autouse fixture


class Darken(SemanticTransform):
    """T(x, delta) = x (1 - delta / 2), shifted by the sample index so T depends on the index too."""

    def __call__(self, x, delta, index=None):
        shift = 0.0 if index is None else 0.001 * index.to(x.dtype).view(-1, 1, 1, 1)
        return x * (1 - 0.5 * torch.as_tensor(delta, dtype=x.dtype).view(-1, 1, 1, 1)) + shift

    def describe(self):
        return {"name": "darken"}


def _setup():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, small_input=True)
    x = torch.rand(23, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    return model, x, y


def _cert(res):
    return build_certificate(res, model_info={"arch": "small_cnn"}, mask_sha256=None,
                             dataset={"ref": "synthetic", "sha256": "0"}, transform={"name": "darken"})


def _certify(spec, sample_range=None):
    model, x, y = _setup()
    return certify_model(model, x, y, Darken(), spec, seed=11, sample_range=sample_range)


# batch 37 (not a multiple of anything here) so the clean passes and groups have ragged edges
SPECS = [CertifySpec(n=4, l=3, samples=21, batch_size=37, epsilon=0.3, t_steps=40),
         CertifySpec(n=4, l=3, samples=21, batch_size=37, epsilon=0.3, early_stop=True, bound="binomial",
                     failure_probability=0.1)]


@pytest.mark.parametrize("spec", SPECS, ids=["full", "early-stop"])
def test_merged_shards_give_the_single_runs_bytes(tmp_path, spec) -> None:
    whole = _certify(spec)
    whole_cert = _cert(whole)
    write_certificate(whole_cert, whole, tmp_path / "whole")
    whole_evidence = (tmp_path / "whole" / "evidence.npz").read_bytes()
    align = shard_alignment(spec, (1, 8, 8))
    assert align == -(-37 // (spec.n * (1 if spec.early_stop else spec.l)))
    for k in (1, 2, 3, 5):
        ranges = shard_ranges(21, k, align)
        parts = [_certify(spec, r) for r in reversed(ranges)]  # any order
        merged = merge_results(parts)
        cert = _cert(merged)
        assert certificate_body(cert) == certificate_body(whole_cert), k
        np.testing.assert_array_equal(merged.deltas, whole.deltas)
        folder = tmp_path / f"k{k}"
        write_certificate(cert, merged, folder)
        assert (folder / "evidence.npz").read_bytes() == whole_evidence, k
        assert verify_certificate(folder / "certificate.json") == []


def test_unaligned_shard_is_still_the_same_per_sample_work() -> None:
    """Deltas are per-sample whatever the boundary; Z may differ only in its last bits off alignment."""
    spec = SPECS[0]
    whole = _certify(spec)
    part = _certify(spec, (1, 8))
    np.testing.assert_array_equal(part.deltas, whole.deltas[1:8])
    np.testing.assert_allclose(part.z, whole.z[1:8], rtol=0, atol=1e-12)
    assert [r["index"] for r in part.samples] == list(range(1, 8))


def test_partials_round_trip(tmp_path) -> None:
    spec = SPECS[1]
    ranges = shard_ranges(21, 2, shard_alignment(spec, (1, 8, 8)))
    parts = [_certify(spec, r) for r in ranges]
    for i, p in enumerate(parts):
        save_partial(p, tmp_path / f"s{i}.npz")
    loaded = [load_partial(tmp_path / f"s{i}.npz") for i in range(len(parts))]
    assert certificate_body(_cert(merge_results(loaded))) == certificate_body(_cert(_certify(spec)))


def test_shard_ranges_tile_on_alignment() -> None:
    for samples in (1, 7, 21, 100):
        for shards in (1, 2, 3, 8, 200):
            for align in (1, 3, 10):
                r = shard_ranges(samples, shards, align)
                assert r[0][0] == 0 and r[-1][1] == samples
                assert all(a < b for a, b in r)
                assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
                assert all(a % align == 0 for a, _ in r)
                assert len(r) == min(shards, -(-samples // align))
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]


def test_shard_count() -> None:
    assert shard_count(CertifySpec(samples=100, shards=4), 100) == 4
    assert shard_count(CertifySpec(samples=3, shards=4), 3) == 3
    assert shard_count(CertifySpec(samples=100), 100) == 1  # 100 x 1001 passes: small
    assert shard_count(CertifySpec(samples=10_000), 10_000) == 10_000 * 1001 // 2_000_000


def test_merge_refuses_gaps_overlaps_and_other_runs() -> None:
    spec = SPECS[0]
    a, b, c = _certify(spec, (0, 7)), _certify(spec, (7, 14)), _certify(spec, (14, 21))
    with pytest.raises(InvalidInput, match="gap or overlap"):
        merge_results([a, c])
    with pytest.raises(InvalidInput, match="cover 14 of 21"):
        merge_results([a, b])
    with pytest.raises(InvalidInput, match="gap or overlap"):
        merge_results([a, a, b, c])
    other = _certify(spec.model_copy(update={"epsilon": 0.2}), (14, 21))
    with pytest.raises(InvalidInput, match="different runs"):
        merge_results([a, b, other])
    with pytest.raises(InvalidInput, match="not within"):
        _certify(spec, (5, 30))
