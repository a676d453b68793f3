"""Pipeline stages: pretrain -> mask search -> binarize -> finetune -> evaluate -> certify.

Contract (used by the CLI and the Celery worker alike):

    run_job(spec: JobSpec, out_dir: Path, ctx: StageContext, device: str | None = None) -> dict

writes, for each variant of `spec.variants()` (a variant = one method x prune ratio), a folder
`out_dir/<method>-<ratio>/` (e.g. `car-0.50`, `vanilla-0.00`) holding
    model.safetensors   pruned weights (zeros where the mask is 0), loadable into a plain model
    model.pt2           model.program jobs only: the pruned torch.export program (core.program)
    mask.safetensors    bool masks per prunable layer (absent for unpruned methods)
    metrics.json        {"method","prune_ratio","accuracy","sparsity","layers":[...],"seconds",...}
    certificate.json    the DESIGN.md certificate
    evidence.npz        every Z value, for `carcert verify`
    examples.npz        the report's example images: a few certified test images x and T(x, delta)
                        as small uint8 thumbnails (core.report.save_examples)
and returns the summary {"variants": [...]}, one core.results.VariantResult (as a dict) per variant.
kind=certify jobs write a single folder `certify/`.

Progress, cancel and checkpoints go through `ctx`; a rerun with the same out_dir and ctx resumes
from the last checkpoint and gives the same result as an uninterrupted run with the same seed.

Details:
- run_job(..., *, job_id=None, allowed_roots=None, only=None): job_id goes into the certificates
  (default getattr(ctx, "job_id", None)); allowed_roots confines the dataset / weights / mask paths;
  `only` (kind=prune) runs just the named variants (variant_names) and returns just theirs: [] runs
  only the shared pretraining (checkpoint "pretrain"), ["car-0.50"] one variant that starts from that
  checkpoint when it exists. A sweep split so (worker fan-out: one call with [] then one call per
  variant, anywhere sharing the checkpoints) writes the same files as one call with only=None.
  kind=certify: only=["shard-<i>"] computes shard i of a split certification (certify_unit_names,
  core.shards) into certify/shards/<i>.npz; a whole run loads the shards it finds and computes the rest.
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

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.baselines import run_method
from core.certify import build_certificate, certify_model, describe_model, write_certificate
from core.context import ScopedContext, Slots, StageContext, check_cancel, write_json
from core.data import DatasetSplit, load_dataset
from core.errors import InvalidInput, WeightsError
from core.masking import apply_masks_, load_masks, save_masks
from core.methods import method_info
from core.models import (
    build_model,
    canonicalize_safetensors,
    default_small_input,
    file_sha256,
    load_weights,
    save_weights,
)
from core.objectstore import ObjectStore
from core.paths import within_roots
from core.preprocess import attach_normalize, metadata_entry, normalize_for, preprocess_dict
from core.results import VariantResult
from core.shards import certify_in_shards, certify_ranges
from core.spec import JobSpec, PruningSpec
from core.training import augment_with_transform, evaluate, train_epochs
from core.transforms import build_transform, transform_description

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
# under "<variant>/result"; a variant whose folder has certificate.json and the final metrics.json
# (with "pca", written last) is not recomputed.
# torch / numpy RNGs are reseeded from spec.seed before every step, so a variant's result does not
# depend on which other variants ran before it in this process (resume = uninterrupted run).

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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model_info(model: torch.nn.Module, masks: Any, arch: str, sha256: str, extra: dict) -> dict:
    """The certificate's "model" entry (core.certify.describe_model) plus the shape fields."""
    return {**describe_model(model, arch, sha256, masks), **extra}


def _certify_and_write(
    model: torch.nn.Module,
    data: DatasetSplit,
    transform: Any,
    spec: JobSpec,
    folder: Path,
    ctx: StageContext,
    device: str,
    model_info: dict,
    mask_sha256: str | None,
    job_id: str | None,
) -> Any:
    _seed_all(spec.seed)
    if len(certify_ranges(spec.certification, data.test_x)) > 1:  # core.shards: the same result
        result = certify_in_shards(model, data.test_x, data.test_y, transform, spec.certification,
                                   seed=spec.seed, device=device, ctx=ctx, folder=folder)
    else:
        result = certify_model(
            model, data.test_x, data.test_y, transform, spec.certification, seed=spec.seed, device=device,
            ctx=ctx, checkpoint_key="certify",
        )
    cert = build_certificate(
        result,
        model_info=model_info,
        mask_sha256=mask_sha256,
        dataset={"ref": data.ref, "sha256": data.sha256, "split_seed": data.split_seed,
                 "train_subset": spec.train_subset},
        transform=transform_description(transform),
        job_id=job_id,
    )
    write_certificate(cert, result, folder)
    _write_examples(data, transform, cert["samples"], folder)
    return result


def _write_examples(data: DatasetSplit, transform: Any, samples: list[dict], folder: Path) -> None:
    """folder/examples.npz: the report's example images (core.report.save_examples) for the
    certificate's first certified samples, so a report of uploaded data has them too."""
    from core import report

    chosen = report.example_samples(samples)
    if not chosen:
        return
    index = torch.tensor([int(s["index"]) for s in chosen], dtype=torch.int64)
    examples = report.make_examples(data.test_x[index], transform, report.EXAMPLE_DELTAS, index, chosen)
    report.save_examples(folder / "examples.npz", examples)


def _load_data(spec: JobSpec, allowed_roots: Any, objects: ObjectStore | None) -> DatasetSplit:
    return load_dataset(spec.dataset, seed=spec.seed, allowed_roots=allowed_roots,
                        train_subset=spec.train_subset, resize=spec.preprocess.resize,
                        crop=spec.preprocess.crop, objects=objects)


def _with_preprocess(model: torch.nn.Module, info: dict[str, Any], spec: JobSpec,
                     in_channels: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model normalising its input per spec.preprocess (core.preprocess), and its shape info
    with the recorded "preprocess" entry."""
    try:
        norm = normalize_for(spec.preprocess, in_channels)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    recorded = preprocess_dict(spec.preprocess)
    return attach_normalize(model, norm), ({**info, "preprocess": recorded} if recorded else info)


def _arch(spec: JobSpec) -> str:
    """The model's name in metrics and certificates: the architecture, or "program"."""
    return "program" if getattr(spec.model, "program", None) else spec.model.arch


def _build_program(
    spec: JobSpec, data: DatasetSplit, allowed_roots: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A user's torch.export program (core.program), checked against the dataset."""
    from core.program import check_classifier, load_program_model, require_trainable

    path = _weights_path(allowed_roots, "program", spec.model.program)
    model = load_program_model(path)
    if spec.kind == "prune":
        require_trainable(model)
    num_classes = check_classifier(model, data.test_x, spec.model.num_classes or data.num_classes)
    return _with_preprocess(model, {"num_classes": num_classes, "in_channels": data.in_channels,
                                    "program_sha256": file_sha256(path)}, spec, data.in_channels)


def _build(
    spec: JobSpec, data: DatasetSplit, allowed_roots: Any = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if getattr(spec.model, "program", None):
        return _build_program(spec, data, allowed_roots)
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
    info = {"num_classes": num_classes, "in_channels": in_channels, "small_input": small}
    return _with_preprocess(model, info, spec, in_channels)


def _weights_path(allowed_roots: Any, what: str, ref: str) -> Path:
    path = Path(ref).expanduser()
    if allowed_roots is not None and not within_roots(path, allowed_roots):
        raise WeightsError(f"{what} path {ref!r} is outside the allowed directories")
    return path


def run_job(
    spec: JobSpec,
    out_dir: Path,
    ctx: StageContext,
    device: str | None = None,
    *,
    job_id: str | None = None,
    allowed_roots: Any = None,
    objects: ObjectStore | None = None,
    only: list[str] | None = None,
) -> dict:
    """Run a JobSpec into `out_dir` (module docstring). `job_id` goes into the certificates
    (default: ctx.job_id if the context has one); `allowed_roots` confines dataset, weights and
    mask paths (None: no restriction, the CLI case); `objects` reads imagefolder:s3:// datasets;
    `only`: these variants of a prune job (module docstring). Returns {"variants": [...], "seconds"}."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device(device)
    job_id = job_id if job_id is not None else getattr(ctx, "job_id", None)
    check_cancel(ctx, "loading data")
    data = _load_data(spec, allowed_roots, objects)
    if spec.kind == "certify":
        summary = _run_certify(spec, data, out_dir, ctx, device, job_id, allowed_roots, only)
    else:
        summary = _run_prune(spec, data, out_dir, ctx, device, job_id, allowed_roots, only)
    summary["seconds"] = time.perf_counter() - started
    summary["dataset"] = {"ref": data.ref, "sha256": data.sha256}
    ctx.progress("done", 1.0, "")
    return summary


def _finished(folder: Path) -> bool:
    """Whether a variant (or a certify job) in `folder` is complete: certificate.json and the final
    metrics.json, the one with "pca", written last (a run killed between the certificate and that
    write is not finished, and certifies again on resume)."""
    try:
        return (folder / "certificate.json").is_file() and "pca" in json.loads(
            (folder / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _summary_entry(folder: Path) -> dict:
    """The summary's entry of a finished variant: its core.results.VariantResult as a dict."""
    return VariantResult.read(folder).model_dump()


def _run_certify(spec: JobSpec, data: DatasetSplit, out_dir: Path, ctx: StageContext, device: str,
                 job_id: str | None, allowed_roots: Any, only: list[str] | None = None) -> dict:
    folder = out_dir / "certify"
    folder.mkdir(parents=True, exist_ok=True)
    shard = _shard_of(only)
    if shard is None and _finished(folder):
        return {"variants": [_summary_entry(folder)]}
    t0 = time.perf_counter()
    model, shape_info = _build(spec, data, allowed_roots)
    wpath = _weights_path(allowed_roots, "weights", spec.model.weights) if spec.model.weights else None
    if wpath is not None:
        load_weights(model, wpath)
    masks = mask_sha = None
    if spec.mask:
        mpath = _weights_path(allowed_roots, "mask", spec.mask)
        masks = load_masks(mpath)
        apply_masks_(model, masks)
        mask_sha = file_sha256(mpath)
    model.to(device).eval()
    if shard is not None:  # one shard of the certification (core.shards), for the final merge
        check_cancel(ctx, f"certification shard {shard}")
        transform = build_transform(spec.transform, data=data, split="test")
        certify_in_shards(model, data.test_x, data.test_y, transform, spec.certification, seed=spec.seed,
                          device=device, ctx=ctx, folder=folder, only=shard)
        return {"variants": []}
    slots = Slots()
    slots.add("certify", "evaluate", 0.05)
    slots.add("certify", "certify", 1.0)
    sctx = ScopedContext(ctx, "certify", slots)
    transform = build_transform(spec.transform, data=data, split="test")
    check_cancel(ctx, "evaluation")
    sctx.progress("evaluate", 0.0, "evaluating")
    accuracy = evaluate(model, data.test_x, data.test_y)
    model_sha = file_sha256(wpath) if wpath is not None else shape_info["program_sha256"]
    info = _model_info(model, masks, _arch(spec), model_sha, shape_info)
    result = _certify_and_write(model, data, transform, spec, folder, sctx, device, info, mask_sha, job_id)
    metrics = {
        "name": "certify", "method": None, "prune_ratio": None, "accuracy": accuracy,
        "accuracy_cert_subset": result.accuracy, "pca": result.pca,
        "failure_probability": result.failure_probability, "sparsity": info["sparsity"],
        "params": info["params"], "nonzero": info["nonzero"], "layers": info["layers"],
        "model_sha256": model_sha, "mask_sha256": mask_sha, "arch": _arch(spec), **shape_info,
        "dataset": data.describe(), "device": device, "seconds": time.perf_counter() - t0,
        "certify_seconds": result.seconds,
    }
    write_json(folder / "metrics.json", metrics)
    return {"variants": [_summary_entry(folder)]}


def _shard_of(only: list[str] | None) -> int | None:
    """The shard index of only=["shard-<i>"] (a certify job's unit), else None."""
    if only and len(only) == 1 and only[0].startswith("shard-") and only[0][6:].isdigit():
        return int(only[0][6:])
    return None


def certify_unit_names(spec: JobSpec) -> list[str]:
    """A certify job's units when its certification is split (certification.shards, or automatic for
    spec.certification.samples rows; core.shards): "shard-0".."shard-<k-1>" then "certify" (the merge,
    which also computes any shard it finds missing); [] when it is not split."""
    from core.shards import shard_count

    k = shard_count(spec.certification, spec.certification.samples)
    return [f"shard-{i}" for i in range(k)] + ["certify"] if spec.kind == "certify" and k > 1 else []


def variant_names(spec: JobSpec) -> list[str]:
    """The distinct variant folder names of a prune job, in run order (certify jobs: ["certify"])."""
    if spec.kind == "certify":
        return ["certify"]
    names: list[str] = []
    for v in spec.variants():
        name = variant_name(v.method, v.prune_ratio)
        if name not in names:
            names.append(name)
    return names


def _variant_spec(v: PruningSpec, shared: bool, user_weights: bool) -> PruningSpec:
    """The PruningSpec handed to run_method: no pretraining of its own when the variant starts from
    the shared pretrained model or from user weights."""
    if user_weights or (shared and method_info(v.method).shares_pretraining):
        return v.model_copy(update={"pretrain_epochs": 0})
    return v


def _stage_plan(variant: PruningSpec, n_train: int, n_test: int, cert: Any) -> list[tuple[str, float]]:
    """(stage, weight in training-epoch units) of one variant's run_method + evaluate + certify."""
    plan: list[tuple[str, float]] = []
    info = method_info(variant.method)
    if variant.pretrain_epochs > 0:
        plan.append(("pretrain", variant.pretrain_epochs))
    if info.searches_mask:
        plan.append(("search", _SEARCH_COST * variant.search_epochs))
    if info.prunes:
        plan.append(("finetune", variant.finetune_epochs))
    plan.append(("evaluate", n_test / (3.0 * max(1, n_train))))
    plan.append(("certify", min(cert.samples, n_test) * cert.l * cert.n / (3.0 * max(1, n_train))))
    return plan


class _PrunePlan:
    """What a prune job will do: its distinct variants, which still lack a certificate, whether
    the shared pretraining runs, and the progress slots of all of it."""

    def __init__(self, spec: JobSpec, data: DatasetSplit, out_dir: Path, ctx: StageContext,
                 only: list[str] | None = None) -> None:
        self.variants: list[tuple[str, PruningSpec]] = []
        for v in spec.variants():
            name = variant_name(v.method, v.prune_ratio)
            if name not in (n for n, _ in self.variants) and (only is None or name in only):
                self.variants.append((name, v))
        if only is not None and len(self.variants) != len(set(only)):
            unknown = sorted(set(only) - {n for n, _ in self.variants})
            raise InvalidInput(f"no variant(s) {unknown} in this job")
        self.user_weights = spec.model.weights is not None or spec.model.program is not None
        todo = [(n, v) for n, v in self.variants if not _finished(out_dir / n)]
        self.pretrain_epochs = spec.pruning.pretrain_epochs
        self.shared = not self.user_weights and self.pretrain_epochs > 0
        self.need_shared = self.shared and (only == [] or any(  # a finished "result" needs none
            method_info(v.method).shares_pretraining and ctx.load_checkpoint(f"{n}/result") is None
            for n, v in todo
        ))
        self.any_todo = bool(todo)
        n_train, n_test = data.train_x.shape[0], data.test_x.shape[0]
        self.slots = Slots()
        if self.need_shared and not only:  # a variant run alone: its progress is its own
            self.slots.add("job", "pretrain", self.pretrain_epochs)
        for n, v in todo:
            for stage, w in _stage_plan(self.spec_of(v), n_train, n_test, spec.certification):
                self.slots.add(n, stage, w)

    def spec_of(self, v: PruningSpec) -> PruningSpec:
        return _variant_spec(v, self.shared, self.user_weights)

    def pretrained(self, v: PruningSpec) -> str:
        """metrics.json "pretrained": where the variant's starting model came from."""
        if self.shared and method_info(v.method).shares_pretraining:
            return "shared"
        return "user weights" if self.user_weights else "own"


def _shared_pretrain(model: torch.nn.Module, spec: JobSpec, data: DatasetSplit, train_t: Any,
                     ctx: StageContext, plan: _PrunePlan) -> None:
    """Cross-entropy pretraining once for every variant that starts from it (checkpoint "pretrain")."""
    check_cancel(ctx, "pretraining")
    jctx = ScopedContext(ctx, "job", plan.slots, prefix="")  # checkpoint key "pretrain"
    _seed_all(spec.seed)
    q = spec.pruning.augment_q
    x, y, _ = augment_with_transform(data.train_x, data.train_y, train_t, q, spec.seed)
    train_epochs(model, x, y, epochs=plan.pretrain_epochs, lr=spec.pruning.lr,
                 batch_size=spec.pruning.batch_size, seed=spec.seed, ctx=jctx, stage="pretrain",
                 checkpoint_key="pretrain", amp=spec.pruning.amp)


def _train_variant(vmodel: torch.nn.Module, vspec: PruningSpec, spec: JobSpec, data: DatasetSplit,
                   train_t: Any, vctx: ScopedContext, t0: float) -> tuple[Any, float]:
    """run_method on `vmodel` in place, or its "result" checkpoint when a previous run finished it.
    Returns (bool CPU masks or None, training seconds)."""
    done = vctx.load_checkpoint("result")
    if done is not None:
        vmodel.load_state_dict(done["model"])
        return done.get("masks"), float(done.get("seconds", 0.0))
    _seed_all(spec.seed)
    masks = run_method(vspec.method, vmodel, data, train_t, vspec, seed=spec.seed, ctx=vctx)
    masks = {k: m.detach().cpu().bool() for k, m in masks.items()} if masks is not None else None
    if masks is not None:
        apply_masks_(vmodel, masks)
    train_seconds = time.perf_counter() - t0
    state = {"model": {k: t.detach().cpu() for k, t in vmodel.state_dict().items()}, "seconds": train_seconds}
    if masks is not None:
        state["masks"] = masks
    vctx.save_checkpoint("result", state)
    return masks, train_seconds


def _save_model_files(vmodel: torch.nn.Module, masks: Any, folder: Path, meta: dict[str, str]
                      ) -> tuple[str, str | None]:
    """model.safetensors (+ mask.safetensors), canonical bytes; returns (model sha256, mask sha256)."""
    model_sha = save_weights(vmodel, folder / "model.safetensors", metadata=meta)
    mask_sha = None
    if masks is not None:
        save_masks(folder / "mask.safetensors", masks, metadata=meta)
        mask_sha = canonicalize_safetensors(folder / "mask.safetensors")  # stable bytes
    return model_sha, mask_sha


def _finish_variant(name: str, v: PruningSpec, vmodel: torch.nn.Module, masks: Any, train_seconds: float,
                    t0: float, spec: JobSpec, data: DatasetSplit, test_t: Any, folder: Path,
                    vctx: ScopedContext, ctx: StageContext, device: str, job_id: str | None,
                    shape_info: dict[str, Any], pretrained: str) -> None:
    """Evaluate, write the model files and metrics.json, certify, complete metrics.json."""
    check_cancel(ctx, f"evaluating {name}")
    vmodel.to(device).eval()
    vctx.progress("evaluate", 0.0, "evaluating")
    accuracy = evaluate(vmodel, data.test_x, data.test_y)
    vctx.progress("evaluate", 1.0, f"accuracy {accuracy:.4f}")
    meta = {"arch": _arch(spec), "method": v.method, "prune_ratio": repr(v.prune_ratio), "dataset": data.ref,
            **{k: str(val) for k, val in shape_info.items() if k != "preprocess"},
            **metadata_entry(spec.preprocess)}
    model_sha, mask_sha = _save_model_files(vmodel, masks, folder, meta)
    extra = dict(shape_info)
    if "program_sha256" in shape_info:  # the pruned program: torch.export.load(p).module()
        from core.program import export_program

        extra["pt2_sha256"] = export_program(vmodel, data.test_x, folder / "model.pt2")
    info = _model_info(vmodel, masks, _arch(spec), model_sha, extra)
    metrics = {
        "name": name, "method": v.method, "prune_ratio": v.prune_ratio, "scope": v.scope,
        "accuracy": accuracy, "sparsity": info["sparsity"], "params": info["params"],
        "nonzero": info["nonzero"], "layers": info["layers"], "model_sha256": model_sha,
        "mask_sha256": mask_sha, "arch": _arch(spec), **extra, "dataset": data.describe(),
        "pretrained": pretrained, "device": device, "seed": spec.seed, "train_seconds": train_seconds,
    }
    write_json(folder / "metrics.json", metrics)  # before certifying: accuracy is known
    check_cancel(ctx, f"certifying {name}")
    result = _certify_and_write(vmodel, data, test_t, spec, folder, vctx, device, info, mask_sha, job_id)
    metrics.update({"pca": result.pca, "accuracy_cert_subset": result.accuracy,
                    "failure_probability": result.failure_probability,
                    "certify_seconds": result.seconds, "seconds": time.perf_counter() - t0})
    write_json(folder / "metrics.json", metrics)


def _run_prune(spec: JobSpec, data: DatasetSplit, out_dir: Path, ctx: StageContext, device: str,
               job_id: str | None, allowed_roots: Any, only: list[str] | None = None) -> dict:
    plan = _PrunePlan(spec, data, out_dir, ctx, only)
    model, shape_info = _build(spec, data, allowed_roots)
    if spec.model.weights is not None:
        load_weights(model, _weights_path(allowed_roots, "weights", spec.model.weights))
    model.to(device)
    train_t = test_t = None
    if plan.any_todo or plan.need_shared:
        train_t = build_transform(spec.transform, data=data, split="train")
        test_t = build_transform(spec.transform, data=data, split="test")
    if plan.need_shared:
        _shared_pretrain(model, spec, data, train_t, ctx, plan)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for name, v in plan.variants:
        folder = out_dir / name
        if _finished(folder):
            continue
        check_cancel(ctx, name)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        vctx = ScopedContext(ctx, name, plan.slots)
        vmodel = copy.deepcopy(model)
        vmodel.load_state_dict(initial)
        masks, train_seconds = _train_variant(vmodel, plan.spec_of(v), spec, data, train_t, vctx, t0)
        _finish_variant(name, v, vmodel, masks, train_seconds, t0, spec, data, test_t, folder, vctx, ctx,
                        device, job_id, shape_info, plan.pretrained(v))
    return {"variants": [_summary_entry(out_dir / name) for name, _ in plan.variants]}
