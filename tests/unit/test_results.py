"""core.results.VariantResult: the typed hand-off from the pipeline to worker, store and report."""

from __future__ import annotations

import json
from types import SimpleNamespace

from core.results import VariantResult


def test_read_takes_the_result_fields_of_metrics_json_and_ignores_the_rest(tmp_path):
    metrics = {
        "name": "car-0.50",
        "method": "car",
        "prune_ratio": 0.5,
        "accuracy": 0.9,
        "pca": 0.8,
        "accuracy_cert_subset": 0.85,
        "sparsity": 0.5,
        "model_sha256": "ab",
        "mask_sha256": "cd",
        "failure_probability": 1e-3,
        "layers": [{"name": "fc"}],
        "seconds": 3.0,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    r = VariantResult.read(tmp_path)
    assert r.model_dump() == {k: metrics[k] for k in VariantResult.model_fields}
    assert list(r.model_dump()) == [
        "name",
        "method",
        "prune_ratio",
        "accuracy",
        "pca",
        "accuracy_cert_subset",
        "sparsity",
        "model_sha256",
        "mask_sha256",
        "failure_probability",
    ]
    assert (r.method_label, r.ratio) == ("car", 0.5)


def test_a_certify_job_result_is_stored_as_method_certify_at_ratio_zero():
    r = VariantResult.model_validate({"name": "certify", "method": None, "prune_ratio": None, "pca": 0.7})
    assert (r.method_label, r.ratio, r.pca, r.accuracy) == ("certify", 0.0, 0.7, None)


def test_from_row_reads_attributes_and_leaves_missing_ones_none():
    row = SimpleNamespace(
        name="lmp-0.30", method="lmp", prune_ratio=0.3, accuracy=0.5, pca=None, sparsity=0.3
    )
    r = VariantResult.from_row(row)
    assert (r.name, r.method, r.prune_ratio, r.sparsity, r.model_sha256) == (
        "lmp-0.30",
        "lmp",
        0.3,
        0.3,
        None,
    )


def test_metrics_written_before_the_rename_are_still_read(tmp_path):
    """metrics.json of older runs calls accuracy_cert_subset certified_accuracy; it reads the same."""
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "lmp-0.50", "certified_accuracy": 0.75}))
    r = VariantResult.read(tmp_path)
    assert r.accuracy_cert_subset == 0.75 and "certified_accuracy" not in r.model_dump()
    both = VariantResult.model_validate({"name": "x", "accuracy_cert_subset": 0.5, "certified_accuracy": 0.1})
    assert both.accuracy_cert_subset == 0.5  # the new key wins
