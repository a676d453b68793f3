"""core.pipeline.run_job end to end on digits (small_cnn, tiny epochs and certification)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.certify import verify_certificate
from core.context import LocalContext
from core.data import load_dataset
from core.errors import Cancelled, InvalidInput, WeightsError
from core.masking import load_masks, prunable_weights
from core.models import build_model, file_sha256, load_weights
from core.pipeline import run_job, variant_name, variant_names
from core.spec import JobSpec
from core.training import evaluate

SPEC = {
    "dataset": "digits",
    "model": {"arch": "small_cnn"},
    "transform": {"kind": "parametric", "name": "brightness"},
    "pruning": {"pretrain_epochs": 1, "search_epochs": 1, "finetune_epochs": 1, "batch_size": 32,
                "augment_q": 100, "lr": 0.1},
    "certification": {"n": 10, "l": 2, "samples": 5, "t_steps": 50},
    "sweep_methods": ["vanilla", "lmp"],
    "sweep_prune_ratios": [0.5],
    "train_subset": 600,
    "seed": 0,
}
VARIANTS = ("vanilla-0.00", "lmp-0.50")


def _spec(**update) -> JobSpec:
    return JobSpec.model_validate({**SPEC, **update})


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, float, str]] = []

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        self.events.append((stage, fraction, message))


def _run(out: Path, spec: JobSpec | None = None, only: list[str] | None = None, **ctx_kw
         ) -> tuple[dict, Recorder]:
    rec = Recorder()
    summary = run_job(spec or _spec(), out, LocalContext(out, on_progress=rec, **ctx_kw), device="cpu",
                      only=only)
    return summary, rec


def _body(path: Path) -> dict:
    cert = json.loads(path.read_text())
    return {k: v for k, v in cert.items() if k not in ("created_at", "job_id")}


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, dict, Recorder]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("job")
    summary, rec = _run(out)
    return out, summary, rec


def test_variant_names() -> None:
    assert variant_name("car", 0.5) == "car-0.50" and variant_name("vanilla", 0.0) == "vanilla-0.00"
    assert variant_name("lmp", 0.505) == "lmp-0.505"


def test_outputs_and_mask_counts(first) -> None:
    out, summary, _ = first
    assert [v["name"] for v in summary["variants"]] == list(VARIANTS)
    for name in VARIANTS:
        for f in ("model.safetensors", "metrics.json", "certificate.json", "evidence.npz"):
            assert (out / name / f).is_file(), (name, f)
    assert not (out / "vanilla-0.00" / "mask.safetensors").exists()
    masks = load_masks(out / "lmp-0.50" / "mask.safetensors")
    model = build_model("small_cnn", 10, 1)
    load_weights(model, out / "lmp-0.50" / "model.safetensors")
    weights = prunable_weights(model)
    assert set(masks) == set(weights)
    for name, m in masks.items():
        n = m.numel()
        assert int(m.sum()) == round(0.5 * n), name  # exact per-layer count (scope "layer")
        assert torch.all(weights[name][~m] == 0), name  # pruned entries are zero in the model file
    metrics = json.loads((out / "lmp-0.50" / "metrics.json").read_text())
    total = sum(w.numel() for w in weights.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert metrics["params"] == total and metrics["nonzero"] <= kept
    assert metrics["sparsity"] == pytest.approx(1 - metrics["nonzero"] / total)
    assert metrics["mask_sha256"] == file_sha256(out / "lmp-0.50" / "mask.safetensors")


@pytest.mark.parametrize("name", VARIANTS)
def test_model_file_reproduces_accuracy_and_certificate(first, name: str) -> None:
    out, summary, _ = first
    data = load_dataset("digits", seed=0, train_subset=600)
    model = build_model("small_cnn", 10, 1)
    load_weights(model, out / name / "model.safetensors")
    metrics = json.loads((out / name / "metrics.json").read_text())
    acc = evaluate(model, data.test_x, data.test_y)
    assert acc == metrics["accuracy"]
    assert acc > 0.5  # 1 epoch of small_cnn on 600 digits: measured ~0.9; chance is 0.1
    cert = json.loads((out / name / "certificate.json").read_text())
    assert cert["model"]["sha256"] == file_sha256(out / name / "model.safetensors") == metrics["model_sha256"]
    assert cert["dataset"] == {"ref": "digits", "sha256": data.sha256, "split_seed": 0, "train_subset": 600}
    assert cert["params"]["n"] == 10 and cert["params"]["l"] == 2 and cert["params"]["samples"] == 5
    assert verify_certificate(out / name / "certificate.json") == []
    # the files beside it are the certified ones, and re-running them reproduces the evidence
    from core.verify import check_files, recompute

    assert check_files(out / name / "certificate.json") == []
    assert recompute(out / name / "certificate.json") == []
    # the certificate's clean predictions are the model file's predictions on the first 5 samples
    with torch.no_grad():
        pred = model.eval()(data.test_x[:5]).argmax(1).tolist()
    assert [s["pred"] for s in cert["samples"]] == pred
    entry = next(v for v in summary["variants"] if v["name"] == name)
    assert entry["pca"] == cert["pca"] and entry["accuracy"] == acc


def test_progress_is_monotonic_and_complete(first) -> None:
    _, _, rec = first
    fractions = [f for _, f, _ in rec.events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = {s for s, _, _ in rec.events}
    assert {"pretrain", "finetune", "evaluate", "certify"} <= stages


def test_shared_pretraining_equals_standalone_method(first) -> None:
    """The lmp variant (shared pretraining, then run_method without it) equals run_method('lmp')
    doing its own pretraining from the same seeded model."""
    from core.baselines import run_method
    from core.transforms import build_transform

    out, _, _ = first
    spec = _spec()
    data = load_dataset("digits", seed=0, train_subset=600)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    v = next(p for p in spec.variants() if p.method == "lmp")
    t = build_transform(spec.transform, data=data, split="train")
    run_method("lmp", model, data, t, v, seed=0)
    ours = build_model("small_cnn", 10, 1)
    load_weights(ours, out / "lmp-0.50" / "model.safetensors")
    for k, val in model.state_dict().items():
        assert torch.allclose(val, ours.state_dict()[k], atol=1e-6), k


def test_same_seed_same_certificate(first, tmp_path: Path) -> None:
    out, _, _ = first
    _run(tmp_path)
    for name in VARIANTS:
        a, b = out / name / "certificate.json", tmp_path / name / "certificate.json"
        assert _body(a) == _body(b)
        strip = [line for line in a.read_text().splitlines() if "created_at" not in line]
        assert strip == [line for line in b.read_text().splitlines() if "created_at" not in line]
        model_file = Path(name) / "model.safetensors"
        assert (out / model_file).read_bytes() == (tmp_path / model_file).read_bytes()


def test_split_run_equals_whole_run(first, tmp_path: Path) -> None:
    """The worker fan-out's split: the shared pretraining alone (only=[]), then each variant alone
    in a fresh process state (its own context on the same folder) -> the same files as one run."""
    out, _, _ = first
    assert variant_names(_spec()) == list(VARIANTS)
    pre, rec = _run(tmp_path, only=[])
    assert pre["variants"] == [] and [e for e in rec.events if e[0] == "pretrain" and "loss" in e[2]]
    assert not any((tmp_path / name).exists() for name in VARIANTS)
    for name in reversed(VARIANTS):  # any order
        summary, rec = _run(tmp_path, only=[name])
        assert [v["name"] for v in summary["variants"]] == [name]
        # the shared pretraining resumed from its finished checkpoint: no training step reported
        assert not [e for e in rec.events if e[0] == "pretrain" and "loss" in e[2]]
    for name in VARIANTS:
        assert _body(out / name / "certificate.json") == _body(tmp_path / name / "certificate.json")
        model_file = Path(name) / "model.safetensors"
        assert (out / model_file).read_bytes() == (tmp_path / model_file).read_bytes()
    with pytest.raises(InvalidInput, match="no variant"):
        _run(tmp_path, only=["car-0.90"])


def test_cancel_then_resume_equals_uninterrupted(first, tmp_path: Path) -> None:
    out, _, _ = first
    seen: list[str] = []
    rec = Recorder()

    def flag() -> bool:
        return any(s == "finetune" for s, _, _ in rec.events)

    def on_progress(stage: str, fraction: float, message: str) -> None:
        seen.append(stage)
        rec(stage, fraction, message)

    with pytest.raises(Cancelled):
        ctx = LocalContext(tmp_path, on_progress=on_progress, cancel_flag=flag)
        run_job(_spec(), tmp_path, ctx, device="cpu")
    assert "finetune" in seen
    assert (tmp_path / "vanilla-0.00" / "certificate.json").is_file()  # finished before the cancel
    assert not (tmp_path / "lmp-0.50" / "certificate.json").exists()
    summary, rec2 = _run(tmp_path)
    assert not any(m.startswith("vanilla-0.00") for _, _, m in rec2.events)  # not redone
    for name in VARIANTS:
        assert _body(tmp_path / name / "certificate.json") == _body(out / name / "certificate.json")


def test_resume_reuses_finished_work(first, tmp_path: Path) -> None:
    out, _, _ = first
    shutil.copytree(out, tmp_path / "job")
    job = tmp_path / "job"
    before = (job / "vanilla-0.00" / "certificate.json").stat().st_mtime_ns
    (job / "lmp-0.50" / "certificate.json").unlink()
    _, rec = _run(job)
    stages = [(s, m.split(":")[0]) for s, _, m in rec.events if s != "done"]
    # vanilla untouched; lmp's training came from its "result" checkpoint: no pretrain / finetune
    assert all(owner == "lmp-0.50" for _, owner in stages)
    assert {s for s, _ in stages} == {"evaluate", "certify"}
    assert (job / "vanilla-0.00" / "certificate.json").stat().st_mtime_ns == before
    assert _body(job / "lmp-0.50" / "certificate.json") == _body(out / "lmp-0.50" / "certificate.json")
    # without the result checkpoint, fine-tuning resumes from its per-epoch checkpoint: same result
    (job / "lmp-0.50" / "certificate.json").unlink()
    (job / "checkpoints" / "lmp-0.50_result.pt").unlink()
    _, rec = _run(job)
    assert not any("loss" in m for _, _, m in rec.events)  # no training step ran: all loaded
    assert _body(job / "lmp-0.50" / "certificate.json") == _body(out / "lmp-0.50" / "certificate.json")


def test_resume_after_a_kill_between_certificate_and_final_metrics(first, tmp_path: Path) -> None:
    """A run killed after certificate.json but before metrics.json got its "pca" (the metrics written
    before certifying): the resumed run is not fooled by the two files and completes the metrics."""
    out, _, _ = first
    shutil.copytree(out, tmp_path / "job")
    job = tmp_path / "job"
    metrics = json.loads((job / "lmp-0.50" / "metrics.json").read_text())
    for key in ("pca", "accuracy_cert_subset", "failure_probability", "certify_seconds", "seconds"):
        metrics.pop(key)
    (job / "lmp-0.50" / "metrics.json").write_text(json.dumps(metrics))
    summary, _ = _run(job)
    entry = next(v for v in summary["variants"] if v["name"] == "lmp-0.50")
    expected = json.loads((out / "lmp-0.50" / "metrics.json").read_text())["pca"]
    assert entry["pca"] == expected is not None
    assert _body(job / "lmp-0.50" / "certificate.json") == _body(out / "lmp-0.50" / "certificate.json")


def test_certify_job_matches_prune_certificate(first, tmp_path: Path) -> None:
    out, _, _ = first
    src = out / "lmp-0.50"
    spec = JobSpec.model_validate({
        "kind": "certify", "dataset": "digits", "train_subset": 600,
        "model": {"arch": "small_cnn", "weights": str(src / "model.safetensors")},
        "mask": str(src / "mask.safetensors"), "transform": SPEC["transform"],
        "certification": SPEC["certification"], "seed": 0,
    })
    summary, _ = _run(tmp_path, spec)
    assert [v["name"] for v in summary["variants"]] == ["certify"]
    cert = json.loads((tmp_path / "certify" / "certificate.json").read_text())
    ref = json.loads((src / "certificate.json").read_text())
    assert cert["samples"] == ref["samples"] and cert["pca"] == ref["pca"]
    assert cert["model"]["sha256"] == file_sha256(src / "model.safetensors")
    assert cert["mask_sha256"] == file_sha256(src / "mask.safetensors")
    assert verify_certificate(tmp_path / "certify" / "certificate.json") == []
    metrics = json.loads((tmp_path / "certify" / "metrics.json").read_text())
    assert metrics["accuracy"] == json.loads((src / "metrics.json").read_text())["accuracy"]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="channel"):
        run_job(_spec(model={"arch": "small_cnn", "in_channels": 3}), tmp_path, LocalContext(tmp_path))
    with pytest.raises(InvalidInput, match="num_classes"):
        run_job(_spec(model={"arch": "small_cnn", "num_classes": 5}), tmp_path, LocalContext(tmp_path))
    outside = tmp_path / "w.safetensors"
    outside.write_bytes(b"x")
    with pytest.raises(WeightsError, match="outside the allowed"):
        run_job(_spec(model={"arch": "small_cnn", "weights": str(outside)}), tmp_path / "o",
                LocalContext(tmp_path / "o"), allowed_roots=[tmp_path / "o"])
    with pytest.raises(WeightsError):
        run_job(_spec(model={"arch": "small_cnn", "weights": str(outside)}), tmp_path / "o",
                LocalContext(tmp_path / "o"))


def test_precomputed_variants_from_npz(tmp_path: Path) -> None:
    """An npz shipping variants (delta 0: the image itself, delta 1: brighter) drives both the
    training augmentation (train_subset keeps variants_train aligned) and certification."""
    import numpy as np

    d = load_dataset("digits", seed=0)

    def variants(x: torch.Tensor) -> np.ndarray:
        return torch.stack([x, (x + 0.3).clamp(0, 1)], dim=1).numpy()

    path = tmp_path / "d.npz"
    np.savez(path, x_train=d.train_x.numpy(), y_train=d.train_y.numpy(), x_test=d.test_x.numpy(),
             y_test=d.test_y.numpy(), variants_train=variants(d.train_x), variants_test=variants(d.test_x))
    spec = _spec(dataset=f"npz:{path}", transform={"kind": "precomputed"}, sweep_methods=["vanilla"],
                 sweep_prune_ratios=None)
    out = tmp_path / "out"
    _run(out, spec)
    cert_path = out / "vanilla-0.00" / "certificate.json"
    assert verify_certificate(cert_path) == []
    assert json.loads(cert_path.read_text())["transform"]["kind"] == "precomputed"
    ev = np.load(out / "vanilla-0.00" / "evidence.npz")
    z, deltas = ev["z"], ev["deltas"]
    # below delta 0.5 the nearest variant is the test image itself, exactly ...
    from core.spec import TransformSpec
    from core.transforms import build_transform

    data = load_dataset(f"npz:{path}", seed=0)
    t = build_transform(TransformSpec(kind="precomputed"), data=data, split="test")
    idx = torch.arange(len(data.test_x))
    test_x = data.test_x[:]  # an ImageSource (npz rows read on demand) as one tensor
    assert torch.equal(t(test_x, torch.full((len(idx),), 0.3), index=idx), test_x)
    # ... so its Z is 0 up to float32 rounding: the clean pass and the variants run in batches of
    # other sizes, and CPU conv kernels may round differently per batch size (AVX-512 oneDNN)
    assert np.all(z[deltas < 0.5] < 1e-6)
    assert np.all(z[deltas > 0.5] > 1e-3)
