"""Pipeline stages: pretrain -> mask search -> binarize -> finetune -> evaluate -> certify.

Contract (used by the CLI and the Celery worker alike):

    run_job(spec: JobSpec, out_dir: Path, ctx: StageContext, device: str | None = None) -> dict

writes, for each variant of `spec.variants()` (a variant = one method x prune ratio), a folder
`out_dir/<method>-<ratio>/` (e.g. `car-0.50`, `vanilla-0.00`) holding
    model.safetensors   pruned weights (zeros where the mask is 0), loadable into a plain model
    mask.safetensors    bool masks per prunable layer (absent for unpruned methods)
    metrics.json        {"method","prune_ratio","accuracy","sparsity","layers":[...],"seconds",...}
    certificate.json    the DESIGN.md certificate
    evidence.npz        every Z value, for `carcert verify`
and returns the summary {"variants": [{"name", "method", "prune_ratio", "accuracy", "pca", ...}]}.
kind=certify jobs write a single folder `certify/`.

Progress, cancel and checkpoints go through `ctx`; a rerun with the same out_dir and ctx resumes
from the last checkpoint and gives the same result as an uninterrupted run with the same seed.

Details (owner: helper MODELS):
- run_job(..., *, job_id=None, allowed_roots=None): job_id goes into the certificates (default
  getattr(ctx, "job_id", None)); allowed_roots confines the dataset / weights / mask paths.
- "accuracy" in metrics.json is over the whole test split; the certificate's accuracy and PCA are
  over its first `certification.samples` test samples. The certificate's model.sha256 is the sha256
  of model.safetensors (certify jobs: of the given weights file, with mask_sha256 of the mask file).
- model.safetensors / mask.safetensors are written canonically (core.models.canonical_safetensors),
  so equal results have equal bytes and hashes; the weights carry metadata arch, num_classes,
  in_channels, small_input (core.models.default_small_input of the image size), method, prune_ratio.
- Progress: ctx.progress(stage, overall, "<variant>: <message>") with stage in pretrain, search,
  finetune, evaluate, certify (and "done" at 1.0); overall in [0, 1] never decreases; stage
  weights are their cost in training-epoch units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch


class StageContext(Protocol):
    """What the pipeline needs from its caller."""

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """Report the current stage and overall progress in [0, 1]."""

    def should_cancel(self) -> bool:
        """True once the job was cancelled; the pipeline then raises core.errors.Cancelled."""

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        """Persist `state` (tensors, numbers, strings, lists/dicts of those) under `key`."""

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        """The last state saved under `key`, or None."""


class LocalContext:
    """StageContext on a local folder: checkpoints are `<dir>/checkpoints/<key>.pt`, written
    atomically and read back with torch.load(weights_only=True)."""

    def __init__(
        self,
        directory: Path,
        on_progress: Callable[[str, float, str], None] | None = None,
        cancel_flag: Callable[[], bool] | None = None,
    ) -> None:
        self.dir = Path(directory) / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._on_progress = on_progress
        self._cancel_flag = cancel_flag

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        if self._on_progress is not None:
            self._on_progress(stage, min(max(fraction, 0.0), 1.0), message)

    def should_cancel(self) -> bool:
        return bool(self._cancel_flag and self._cancel_flag())

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.dir / f"{safe}.pt"

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, so equal results give equal bytes)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ run_job
#
# Job flow (kind=prune):
#   load data (spec.train_subset) -> build the model (seeded) -> user weights (then every pretrain is
#   skipped) -> T for training (split "train") and for certification (split "test") ->
#   shared pretraining (cross-entropy on the training set + q samples T(x, 1), checkpoint "pretrain"),
#   once for every variant whose method starts from a cross-entropy pretrained model ->
#   per variant: copy of that model -> core.baselines.run_method (pretrain_epochs = 0 when shared) ->
#   evaluate (full test split) -> model.safetensors + mask.safetensors -> metrics.json ->
#   certify the first `samples` test samples -> certificate.json + evidence.npz.
# Checkpoint keys of a variant are prefixed "<variant>/"; its finished training is checkpointed
# under "<variant>/result"; a variant whose folder has certificate.json is not recomputed.
# torch / numpy RNGs are reseeded from spec.seed before every step, so a variant's result does not
# depend on which other variants ran before it in this process (resume = uninterrupted run).

SHARED_PRETRAIN_METHODS = ("vanilla", "lmp", "hydra", "car")  # step 1 = cross-entropy pretraining
SEARCH_METHODS = ("hydra", "car")
_SEARCH_COST = 2.0  # a mask-search epoch ~ 2 training epochs (4 forwards + 1 backward per batch)


def variant_name(method: str, prune_ratio: float) -> str:
    """Folder name of a variant: "<method>-<ratio with 2 decimals>" (more digits if needed)."""
    text = f"{prune_ratio:.2f}"
    if abs(float(text) - prune_ratio) > 1e-12:
        text = f"{prune_ratio:.6g}"
    return f"{method}-{text}"


def default_device(device: str | None = None) -> str:
    """`device` if given, else "cuda" when available, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Slots:
    """Overall progress: the job is a sequence of slots (a stage of a variant) with cost weights;
    overall = (done weight + weight * fraction) / total weight, never decreasing."""

    def __init__(self) -> None:
        self.order: list[tuple[str, str, float]] = []  # (owner, stage, weight)
        self.best = 0.0

    def add(self, owner: str, stage: str, weight: float) -> None:
        self.order.append((owner, stage, max(float(weight), 1e-6)))

    def overall(self, owner: str, stage: str, fraction: float) -> float | None:
        total = sum(w for _, _, w in self.order)
        done = 0.0
        for o, s, w in self.order:
            if o == owner and s == stage:
                self.best = max(self.best, (done + w * min(max(fraction, 0.0), 1.0)) / total)
                return self.best
            done += w
        return None


class _ScopedContext:
    """A StageContext view for one variant: checkpoint keys prefixed "<owner>/", progress of its
    stages mapped onto the job's overall fraction (unknown stage names keep the current one)."""

    def __init__(self, ctx: StageContext, owner: str, slots: _Slots, prefix: str | None = None) -> None:
        self.ctx, self.owner, self.slots = ctx, owner, slots
        self.prefix = owner if prefix is None else prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        overall = self.slots.overall(self.owner, stage, fraction)
        if overall is None:
            overall = self.slots.best
        text = f"{self.owner}: {message}" if message else self.owner
        self.ctx.progress(stage, overall, text)

    def should_cancel(self) -> bool:
        return self.ctx.should_cancel()

    def save_checkpoint(self, key: str, state: dict[str, Any]) -> None:
        self.ctx.save_checkpoint(self._key(key), state)

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        return self.ctx.load_checkpoint(self._key(key))


def _check_cancel(ctx: StageContext, where: str) -> None:
    from core.errors import Cancelled

    if ctx.should_cancel():
        raise Cancelled(f"job cancelled before {where}")


def _model_info(model: torch.nn.Module, masks: Any, arch: str, sha256: str, extra: dict) -> dict:
    """The certificate's "model" entry (core.certify.describe_model) plus the shape fields."""
    from core.certify import describe_model

    return {**describe_model(model, arch, sha256, masks), **extra}


def _certify_and_write(
    model: torch.nn.Module,
    data: Any,
    transform: Any,
    spec: Any,
    folder: Path,
    ctx: StageContext,
    device: str,
    model_info: dict,
    mask_sha256: str | None,
    job_id: str | None,
) -> Any:
    from core.certify import build_certificate, certify_model, write_certificate
    from core.transforms import transform_description

    _seed_all(spec.seed)
    result = certify_model(
        model, data.test_x, data.test_y, transform, spec.certification, seed=spec.seed, device=device,
        ctx=ctx, checkpoint_key="certify",
    )
    cert = build_certificate(
        result,
        model_info=model_info,
        mask_sha256=mask_sha256,
        dataset={"ref": data.ref, "sha256": data.sha256},
        transform=transform_description(transform),
        job_id=job_id,
    )
    write_certificate(cert, result, folder)
    return result


def _load_data(spec: Any, allowed_roots: Any) -> Any:
    from core.data import load_dataset

    return load_dataset(spec.dataset, seed=spec.seed, allowed_roots=allowed_roots,
                        train_subset=spec.train_subset)


def _build(spec: Any, data: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    from core.errors import InvalidInput
    from core.models import build_model, default_small_input

    num_classes = spec.model.num_classes or data.num_classes
    in_channels = spec.model.in_channels or data.in_channels
    if in_channels != data.in_channels:
        raise InvalidInput(f"model.in_channels={in_channels} but dataset {data.ref!r} has "
                           f"{data.in_channels} channel(s)")
    if num_classes < data.num_classes:
        raise InvalidInput(f"model.num_classes={num_classes} but dataset {data.ref!r} has labels up to "
                           f"{data.num_classes - 1}")
    small = default_small_input(*data.train_x.shape[2:])
    _seed_all(spec.seed)
    model = build_model(spec.model.arch, num_classes, in_channels, small_input=small)
    return model, {"num_classes": num_classes, "in_channels": in_channels, "small_input": small}


def _weights_path(allowed_roots: Any, what: str, ref: str) -> Path:
    path = Path(ref).expanduser()
    if allowed_roots is not None:
        from core.errors import WeightsError

        resolved = path.resolve()
        if not any(resolved.is_relative_to(Path(r).expanduser().resolve()) for r in allowed_roots):
            raise WeightsError(f"{what} path {ref!r} is outside the allowed directories")
    return path


def run_job(
    spec: Any,
    out_dir: Path,
    ctx: StageContext,
    device: str | None = None,
    *,
    job_id: str | None = None,
    allowed_roots: Any = None,
) -> dict:
    """Run a JobSpec into `out_dir` (module docstring). `job_id` goes into the certificates
    (default: ctx.job_id if the context has one); `allowed_roots` confines dataset, weights and
    mask paths (None: no restriction, the CLI case). Returns {"variants": [...], "seconds"}."""
    import time

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device(device)
    job_id = job_id if job_id is not None else getattr(ctx, "job_id", None)
    _check_cancel(ctx, "loading data")
    data = _load_data(spec, allowed_roots)
    if spec.kind == "certify":
        summary = _run_certify(spec, data, out_dir, ctx, device, job_id, allowed_roots)
    else:
        summary = _run_prune(spec, data, out_dir, ctx, device, job_id, allowed_roots)
    summary["seconds"] = time.perf_counter() - started
    summary["dataset"] = {"ref": data.ref, "sha256": data.sha256}
    ctx.progress("done", 1.0, "")
    return summary


def _summary_entry(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    keys = ("name", "method", "prune_ratio", "accuracy", "pca", "certified_accuracy", "sparsity",
            "model_sha256", "mask_sha256", "failure_probability")
    return {k: metrics.get(k) for k in keys}


def _run_certify(spec, data, out_dir, ctx, device, job_id, allowed_roots) -> dict:
    import time

    from core.masking import apply_masks_, load_masks
    from core.models import file_sha256, load_weights
    from core.training import evaluate
    from core.transforms import build_transform

    folder = out_dir / "certify"
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "certificate.json").is_file() and (folder / "metrics.json").is_file():
        return {"variants": [_summary_entry(folder)]}
    t0 = time.perf_counter()
    model, shape_info = _build(spec, data)
    wpath = _weights_path(allowed_roots, "weights", spec.model.weights)
    load_weights(model, wpath)
    masks = mask_sha = None
    if spec.mask:
        mpath = _weights_path(allowed_roots, "mask", spec.mask)
        masks = load_masks(mpath)
        apply_masks_(model, masks)
        mask_sha = file_sha256(mpath)
    model.to(device).eval()
    slots = _Slots()
    slots.add("certify", "evaluate", 0.05)
    slots.add("certify", "certify", 1.0)
    sctx = _ScopedContext(ctx, "certify", slots)
    transform = build_transform(spec.transform, data=data, split="test")
    _check_cancel(ctx, "evaluation")
    sctx.progress("evaluate", 0.0, "evaluating")
    accuracy = evaluate(model, data.test_x, data.test_y)
    model_sha = file_sha256(wpath)
    info = _model_info(model, masks, spec.model.arch, model_sha, shape_info)
    result = _certify_and_write(model, data, transform, spec, folder, sctx, device, info, mask_sha, job_id)
    metrics = {
        "name": "certify", "method": None, "prune_ratio": None, "accuracy": accuracy,
        "certified_accuracy": result.accuracy, "pca": result.pca,
        "failure_probability": result.failure_probability, "sparsity": info["sparsity"],
        "params": info["params"], "nonzero": info["nonzero"], "layers": info["layers"],
        "model_sha256": model_sha, "mask_sha256": mask_sha, "arch": spec.model.arch, **shape_info,
        "dataset": data.describe(), "device": device, "seconds": time.perf_counter() - t0,
        "certify_seconds": result.seconds,
    }
    write_json(folder / "metrics.json", metrics)
    return {"variants": [_summary_entry(folder)]}


def _variant_spec(v: Any, shared: bool, user_weights: bool) -> Any:
    """The PruningSpec handed to run_method: no pretraining of its own when the variant starts from
    the shared pretrained model or from user weights."""
    if user_weights or (shared and v.method in SHARED_PRETRAIN_METHODS):
        return v.model_copy(update={"pretrain_epochs": 0})
    return v


def _stage_plan(variant: Any, n_train: int, n_test: int, cert: Any) -> list[tuple[str, float]]:
    """(stage, weight in training-epoch units) of one variant's run_method + evaluate + certify."""
    plan: list[tuple[str, float]] = []
    if variant.pretrain_epochs > 0:
        plan.append(("pretrain", variant.pretrain_epochs))
    if variant.method in SEARCH_METHODS:
        plan.append(("search", _SEARCH_COST * variant.search_epochs))
    if variant.method not in ("vanilla", "advtrain"):
        plan.append(("finetune", variant.finetune_epochs))
    plan.append(("evaluate", n_test / (3.0 * max(1, n_train))))
    plan.append(("certify", min(cert.samples, n_test) * cert.l * cert.n / (3.0 * max(1, n_train))))
    return plan


def _run_prune(spec, data, out_dir, ctx, device, job_id, allowed_roots) -> dict:
    import copy
    import time

    from core.baselines import run_method
    from core.masking import apply_masks_, save_masks
    from core.models import canonicalize_safetensors, load_weights, save_weights
    from core.training import augment_with_transform, evaluate, train_epochs
    from core.transforms import build_transform

    variants, seen = [], set()
    for v in spec.variants():
        name = variant_name(v.method, v.prune_ratio)
        if name not in seen:
            seen.add(name)
            variants.append((name, v))
    model, shape_info = _build(spec, data)
    user_weights = spec.model.weights is not None
    if user_weights:
        load_weights(model, _weights_path(allowed_roots, "weights", spec.model.weights))
    model.to(device)

    todo = [(n, v) for n, v in variants if not (out_dir / n / "certificate.json").is_file()]
    pretrain_epochs = spec.pruning.pretrain_epochs
    shared = not user_weights and pretrain_epochs > 0
    need_shared = shared and any(  # a finished variant's "result" checkpoint needs no pretraining
        v.method in SHARED_PRETRAIN_METHODS and ctx.load_checkpoint(f"{n}/result") is None for n, v in todo
    )
    n_train, n_test = data.train_x.shape[0], data.test_x.shape[0]
    slots = _Slots()
    if need_shared:
        slots.add("job", "pretrain", pretrain_epochs)
    for n, v in todo:
        for stage, w in _stage_plan(_variant_spec(v, shared, user_weights), n_train, n_test,
                                    spec.certification):
            slots.add(n, stage, w)

    train_t = test_t = None
    if todo:
        train_t = build_transform(spec.transform, data=data, split="train")
        test_t = build_transform(spec.transform, data=data, split="test")
    if need_shared:
        _check_cancel(ctx, "pretraining")
        jctx = _ScopedContext(ctx, "job", slots, prefix="")  # checkpoint key "pretrain"
        _seed_all(spec.seed)
        q = spec.pruning.augment_q
        x, y, _ = augment_with_transform(data.train_x, data.train_y, train_t, q, spec.seed)
        train_epochs(model, x, y, epochs=pretrain_epochs, lr=spec.pruning.lr,
                     batch_size=spec.pruning.batch_size, seed=spec.seed, ctx=jctx, stage="pretrain",
                     checkpoint_key="pretrain", amp=spec.pruning.amp)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for name, v in variants:
        folder = out_dir / name
        if (folder / "certificate.json").is_file() and (folder / "metrics.json").is_file():
            continue
        _check_cancel(ctx, name)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        vctx = _ScopedContext(ctx, name, slots)
        uses_shared = shared and v.method in SHARED_PRETRAIN_METHODS
        vspec = _variant_spec(v, shared, user_weights)
        vmodel = copy.deepcopy(model)
        vmodel.load_state_dict(initial)
        done = vctx.load_checkpoint("result")
        if done is not None:
            vmodel.load_state_dict(done["model"])
            masks = done.get("masks")
            train_seconds = float(done.get("seconds", 0.0))
        else:
            _seed_all(spec.seed)
            masks = run_method(vspec.method, vmodel, data, train_t, vspec, seed=spec.seed, ctx=vctx)
            masks = {k: m.detach().cpu().bool() for k, m in masks.items()} if masks is not None else None
            if masks is not None:
                apply_masks_(vmodel, masks)
            train_seconds = time.perf_counter() - t0
            state = {"model": {k: t.detach().cpu() for k, t in vmodel.state_dict().items()},
                     "seconds": train_seconds}
            if masks is not None:
                state["masks"] = masks
            vctx.save_checkpoint("result", state)
        _check_cancel(ctx, f"evaluating {name}")
        vmodel.to(device).eval()
        vctx.progress("evaluate", 0.0, "evaluating")
        accuracy = evaluate(vmodel, data.test_x, data.test_y)
        vctx.progress("evaluate", 1.0, f"accuracy {accuracy:.4f}")
        meta = {"arch": spec.model.arch, "method": v.method, "prune_ratio": repr(v.prune_ratio),
                "dataset": data.ref, **{k: str(val) for k, val in shape_info.items()}}
        model_sha = save_weights(vmodel, folder / "model.safetensors", metadata=meta)
        mask_sha = None
        if masks is not None:
            save_masks(folder / "mask.safetensors", masks, metadata=meta)
            mask_sha = canonicalize_safetensors(folder / "mask.safetensors")  # stable bytes
        info = _model_info(vmodel, masks, spec.model.arch, model_sha, shape_info)
        metrics = {
            "name": name, "method": v.method, "prune_ratio": v.prune_ratio, "scope": v.scope,
            "accuracy": accuracy, "sparsity": info["sparsity"], "params": info["params"],
            "nonzero": info["nonzero"], "layers": info["layers"], "model_sha256": model_sha,
            "mask_sha256": mask_sha, "arch": spec.model.arch, **shape_info, "dataset": data.describe(),
            "pretrained": "shared" if uses_shared else ("user weights" if user_weights else "own"),
            "device": device, "seed": spec.seed, "train_seconds": train_seconds,
        }
        write_json(folder / "metrics.json", metrics)  # before certifying: accuracy is known
        _check_cancel(ctx, f"certifying {name}")
        result = _certify_and_write(vmodel, data, test_t, spec, folder, vctx, device, info, mask_sha, job_id)
        metrics.update({"pca": result.pca, "certified_accuracy": result.accuracy,
                        "failure_probability": result.failure_probability,
                        "certify_seconds": result.seconds, "seconds": time.perf_counter() - t0})
        write_json(folder / "metrics.json", metrics)
    return {"variants": [_summary_entry(out_dir / name) for name, _ in variants]}
