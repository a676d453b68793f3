"""`carcert prune`: prune a classifier with CAR or a baseline, then certify it (CC-Cert).

    carcert prune --arch small_cnn --dataset digits --transform illumination --method car \\
        --prune-ratio 0.5 [--weights W] [--epochs E | --pretrain-epochs E --search-epochs E \\
        --finetune-epochs E] [--train-subset N --batch-size B] [--n 100 --l 10 --samples 100] \\
        [--seed S] [--device cpu|cuda] --out DIR

    carcert prune --model net.pt2 --dataset digits ...   (your own network, a torch.export program)

writes DIR/model.safetensors (pruned weights; with --model also DIR/model.pt2, the pruned program,
loadable with torch.export.load(p).module() alone), DIR/mask.safetensors (bool masks; not for vanilla /
advtrain), DIR/metrics.json, DIR/certificate.json and DIR/evidence.npz (`carcert verify`).
Several methods or ratios (comma-separated, e.g. --method car,lmp --prune-ratio 0.3,0.5) run as a
sweep sharing one pretraining; each result then goes to DIR/<method>-<ratio>/ and DIR/summary.json.
--transform: a parametric name ("illumination", "brightness+blur", see core.transforms),
"latent:pca:K" (or "pca", component K = --component) for the built-in PCA direction, "latent" with
--encoder/--decoder .pt2 files, or "precomputed" (variants shipped in the npz dataset).
Certification defaults are the paper's (n 100, l 10, 100 samples); lower them for a quick run.
Interrupted runs resume from DIR/.carcert-work (checkpoints) when rerun with the same options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from core.methods import METHODS, prunes
from core.spec import CarSpec

ARCHS = ("small_cnn", "resnet18", "mobilenet_v2", "googlenet")
WORK = ".carcert-work"
FILES = ("model.safetensors", "model.pt2", "mask.safetensors", "metrics.json", "certificate.json",
         "evidence.npz")


def register(subparsers: argparse._SubParsersAction) -> None:
    from carcert.cli_certify import add_bound_options, add_preprocess_options

    p = subparsers.add_parser("prune", help="prune a model (CAR or a baseline) and certify it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help=f"one of {', '.join(ARCHS)} (or --model)")
    p.add_argument("--model", help="your own network: a torch.export .pt2 program (torch.export.save); "
                   "its weights are the trained weights (no pretraining); writes DIR/model.pt2 too")
    p.add_argument("--dataset", required=True,
                   help="digits | fashion-mnist[:DIR] | npz:PATH | imagefolder:PATH")
    p.add_argument("--transform", default="illumination",
                   help="parametric name or 'a+b', 'latent:pca:K', 'pca', 'latent' (+ --encoder/--decoder), "
                        "'precomputed' (default: illumination)")
    p.add_argument("--strength", type=float, default=1.0, help="scales the transform's documented range")
    p.add_argument("--component", type=int, default=0, help="latent / PCA direction index")
    p.add_argument("--encoder", help="torch.export .pt2 encoder (latent)")
    p.add_argument("--decoder", help="torch.export .pt2 decoder (latent)")
    p.add_argument("--method", default="car",
                   help=f"one of {', '.join(METHODS)}; comma-separated for a sweep")
    p.add_argument("--prune-ratio", default="0.5",
                   help="in (0, 1); comma-separated for a sweep (default 0.5)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer", help="binarization scope")
    p.add_argument("--weights",
                   help="trained weights (safetensors / weights_only checkpoint; with --model: of the "
                        "program's state dict): no pretraining")
    p.add_argument("--num-classes", type=int, help="default: the dataset's")
    p.add_argument("--epochs", type=int, help="shorthand: pretrain, search and fine-tune epochs")
    p.add_argument("--pretrain-epochs", type=int, help="default 2 (paper 50)")
    p.add_argument("--search-epochs", type=int, help="CAR / HYDRA mask search; default 2 (paper 100)")
    p.add_argument("--finetune-epochs", type=int, help="default 1 (paper 50)")
    p.add_argument("--lr", type=float, help="pretraining learning rate (default 0.01)")
    p.add_argument("--finetune-lr", type=float, help="default 0.001")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--augment-q", type=int, help="transformed training samples added (default 1000)")
    p.add_argument("--train-subset", type=int, help="use a seeded random N training samples")
    car = CarSpec.model_fields

    def car_default(key: str) -> object:
        return car[key].default

    p.add_argument("--tau", type=float,
                   help=f"CAR partial-scaled init fraction (default {car_default('tau')})")
    for term in ("stab", "ratio", "consis", "l1"):
        p.add_argument(f"--lambda-{term}", type=float,
                       help=f"CAR Eq. 9 weight of L_{term} (default {car_default('lambda_' + term)})")
    p.add_argument("--lambda-ce", type=float,
                   help=f"CAR task anchor: cross-entropy of the hard-mask network (extension of the paper; "
                        f"default {car_default('lambda_ce')}, 0 = Eq. 9 as published)")
    p.add_argument("--mask-lr", type=float,
                   help=f"CAR mask-search learning rate (default {car_default('mask_lr')})")
    p.add_argument("--mask-optimizer", choices=("adam", "sgd"),
                   help=f"CAR mask optimiser (default {car_default('mask_optimizer')})")
    p.add_argument("--ratio-mask", choices=("soft", "hard"),
                   help=f"CAR: L_ratio under the noisy soft mask or the hard top-k mask "
                        f"(default {car_default('ratio_mask')})")
    p.add_argument("--ratio-rows", choices=("all", "correct"),
                   help=f"CAR: rows feeding L_ratio (default {car_default('ratio_rows')})")
    p.add_argument("--ratio-cap", type=float,
                   help=f"CAR: cap on r = Z / (d + eps) in L_ratio (default {car_default('ratio_cap')})")
    p.add_argument("--search-bn", choices=("auto", "frozen", "batch", "recalibrate"),
                   help=f"CAR: BatchNorm statistics in the mask search (default {car_default('search_bn')})")
    p.add_argument("--bn-every", type=int, help=f"CAR: BN re-estimation period ({car_default('bn_every')})")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in training (CUDA; CPUs with bf16)")
    p.add_argument("--n", type=int, default=100, help="certification: deltas per repeat (default 100)")
    p.add_argument("--l", type=int, default=10, help="certification: repeats (default 10)")
    p.add_argument("--samples", type=int, default=100, help="test samples certified (default 100)")
    p.add_argument("--alpha", type=float, default=0.9, help="CC-Cert confidence parameter alpha")
    p.add_argument("--epsilon", type=float, default=1e-3,
                   help="largest bound (a probability) for which a sample counts as certified")
    p.add_argument("--t-steps", type=int, default=500, help="points of the t grid")
    p.add_argument("--bound-order", choices=("conservative", "reference"), default="conservative",
                   help="min over t of max over repeats (conservative) or the reference code's order")
    add_bound_options(p)
    add_preprocess_options(p)
    p.add_argument("--seed", type=int, default=0, help="seeds training and the sampled transformations")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--keep-work", action="store_true", help=f"keep DIR/{WORK} (checkpoints) after success")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prune)


def transform_spec(name: str, *, component: int = 0, strength: float = 1.0, encoder: str | None = None,
                   decoder: str | None = None) -> dict:
    """--transform text -> TransformSpec fields (see the module docstring)."""
    from core.errors import TransformError

    if name.startswith("latent:pca"):
        rest = name[len("latent:pca"):]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise TransformError(f"--transform {name!r}: expected latent:pca:K with K a component index")
            component = int(rest[1:])
        return {"kind": "latent", "component": component, "strength": strength}
    if name == "pca":
        return {"kind": "latent", "component": component, "strength": strength}
    if name == "latent" or encoder or decoder:
        if not (encoder and decoder):
            raise TransformError("--transform latent needs both --encoder and --decoder (.pt2 files)")
        return {"kind": "latent", "component": component, "strength": strength, "encoder": encoder,
                "decoder": decoder}
    if name == "precomputed":
        return {"kind": "precomputed", "strength": strength}
    return {"kind": "parametric", "name": name, "strength": strength}


def _split(text: str, what: str) -> list[str]:
    from core.errors import InvalidInput

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InvalidInput(f"--{what} is empty")
    return items


def build_spec(args: argparse.Namespace):
    """argparse options -> core.spec.JobSpec (pydantic errors become InvalidInput)."""
    from pydantic import ValidationError

    from carcert.cli_certify import preprocess_spec
    from core.errors import InvalidInput
    from core.spec import JobSpec

    if (args.arch is None) == (getattr(args, "model", None) is None):
        raise InvalidInput("give exactly one of --arch (built-in architecture) and --model (.pt2 program)")
    if args.arch is not None and args.arch not in ARCHS:
        raise InvalidInput(f"unknown architecture {args.arch!r} for --arch; valid: {', '.join(ARCHS)}")
    methods = _split(args.method, "method")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InvalidInput(f"unknown --method {', '.join(bad)}; valid: {', '.join(METHODS)}")
    try:
        ratios = [float(r) for r in _split(args.prune_ratio, "prune-ratio")]
    except ValueError:
        raise InvalidInput(f"--prune-ratio must be numbers in (0, 1), got {args.prune_ratio!r}") from None
    pruning: dict = {"method": methods[0], "prune_ratio": ratios[0], "scope": args.scope}
    if not prunes(methods[0]) and len(methods) == 1:
        pruning["prune_ratio"] = 0.0
    epochs = {"pretrain_epochs": args.pretrain_epochs, "search_epochs": args.search_epochs,
              "finetune_epochs": args.finetune_epochs}
    for key, val in epochs.items():
        val = args.epochs if val is None else val
        if val is not None:
            pruning[key] = val
    for key in ("lr", "finetune_lr", "batch_size", "augment_q"):
        if getattr(args, key) is not None:
            pruning[key] = getattr(args, key)
    if args.amp:
        pruning["amp"] = True
    car_keys = ("tau", "lambda_stab", "lambda_ratio", "lambda_consis", "lambda_l1", "lambda_ce", "mask_lr",
                "mask_optimizer", "ratio_mask", "ratio_rows", "ratio_cap", "search_bn", "bn_every")
    car = {k: getattr(args, k) for k in car_keys if getattr(args, k) is not None}
    if car:
        pruning["car"] = car
    body = {
        "kind": "prune",
        "model": _model_fields(args),
        "dataset": args.dataset,
        "transform": transform_spec(args.transform, component=args.component, strength=args.strength,
                                    encoder=args.encoder, decoder=args.decoder),
        "pruning": pruning,
        "certification": {"n": args.n, "l": args.l, "samples": args.samples, "alpha": args.alpha,
                          "epsilon": args.epsilon, "t_steps": args.t_steps, "bound_order": args.bound_order,
                          "bound": args.bound, "failure_probability": args.failure_probability,
                          "early_stop": args.early_stop, "precision": args.precision},
        "train_subset": args.train_subset,
        "seed": args.seed,
        "preprocess": preprocess_spec(args).model_dump(),
    }
    if len(methods) > 1 or len(ratios) > 1:
        body["sweep_methods"] = methods
        pruned = any(prunes(m) for m in methods)
        body["sweep_prune_ratios"] = ratios if pruned else None
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid options: {msgs}") from None


def _model_fields(args: argparse.Namespace) -> dict:
    """--arch / --model / --weights / --num-classes -> ModelSpec fields."""
    fields = {"weights": args.weights, "num_classes": args.num_classes}
    if getattr(args, "model", None) is not None:
        return {**fields, "program": args.model}
    return {**fields, "arch": args.arch}


def _table(rows: list[dict]) -> str:
    head = ("variant", "accuracy", "PCA", "sparsity", "nonzero/params", "seconds")
    lines = [head]
    for r in rows:
        pca = f"{r['pca']:.4f}" if r.get("pca") is not None else "-"
        size = f"{r.get('nonzero', 0)}/{r.get('params', 0)}"
        lines.append((r["name"], f"{r['accuracy']:.4f}", pca, f"{r['sparsity']:.3f}", size,
                      f"{r.get('seconds', 0):.1f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def run_prune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.context import LocalContext, write_json
    from core.pipeline import run_job
    from store.objects import objects_for

    spec = build_spec(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK
    spec_json = spec.model_dump_json()
    stamp = work / "spec.json"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != spec_json):
        shutil.rmtree(work)  # checkpoints of other options: never resume from them
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(spec_json)

    bar = tqdm(total=1000, desc="prune", unit="", bar_format="{desc:<9} {percentage:3.0f}%|{bar}| "
               "{elapsed}<{remaining}{postfix}", disable=args.quiet, file=sys.stderr)

    def on_progress(stage: str, fraction: float, message: str) -> None:
        bar.set_description_str(stage, refresh=False)
        bar.set_postfix_str(message[:60], refresh=False)
        bar.update(max(0, round(fraction * 1000) - bar.n))

    ctx = LocalContext(work, on_progress=on_progress)
    try:
        summary = run_job(spec, work, ctx, device=args.device, objects=objects_for(spec.dataset))
    finally:
        bar.close()
    variants = summary["variants"]
    rows = []
    single = len(variants) == 1
    for v in variants:
        src = work / v["name"]
        dst = out if single else out / v["name"]
        dst.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (dst / name).exists():
                (dst / name).unlink()
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        rows.append(json.loads((dst / "metrics.json").read_text()))
    summary["out"] = str(out)
    write_json(out / "summary.json", summary)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(_table(rows))
    where = [str(out)] if single else [str(out / v["name"]) for v in variants]
    program = ", model.pt2" if spec.model.program else ""
    print(f"results: {', '.join(where)} (model.safetensors{program}, mask.safetensors, metrics.json, "
          "certificate.json, evidence.npz)")
    return 0
