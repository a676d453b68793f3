"""`carcert certify` (CC-Cert certificate of a trained, optionally masked model) and `carcert verify`
(check a certificate against its evidence, model and mask files; exit 1 on any mismatch).

    carcert certify --arch resnet18 --weights model.safetensors [--mask mask.safetensors] \\
        --dataset digits --transform illumination [--n 100 --l 10 --alpha 0.9 --epsilon 1e-3 \\
        --samples 100 --seed 0 --bound-order conservative --bound cccert|binomial \\
        --failure-probability 1e-3 --early-stop --precision fp32|bf16] --out cert.json
    carcert certify --model net.pt2 [--weights W] [--mask M] --dataset digits ... --out cert.json
writes cert.json and cert.evidence.npz beside it. --transform takes a parametric name
(core.transforms.PARAMETRIC, or 'a+b'), 'pca' (built-in PCA latent direction, --component),
'latent' with --encoder/--decoder .pt2 files, or 'precomputed' (variants shipped in an npz).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ARCH_CHOICES = ("small_cnn", "resnet18", "mobilenet_v2", "googlenet")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("certify", help="certify a model against a semantic transformation (CC-Cert)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCH_CHOICES, help="a built-in architecture (or --model)")
    p.add_argument("--model", help="your own network: a torch.export .pt2 program (e.g. model.pt2 of "
                   "`carcert prune --model`)")
    p.add_argument("--weights", help="safetensors or weights_only torch checkpoint (with --model: of the "
                   "program's state dict; default: the program's own weights)")
    p.add_argument("--mask", help="bool masks (safetensors, from `carcert prune`), applied as w * m")
    p.add_argument("--dataset", required=True,
                   help="digits | fashion-mnist[:DIR] | npz:PATH | imagefolder:PATH")
    p.add_argument("--num-classes", type=int, help="default: the dataset's")
    p.add_argument("--input-size", choices=("auto", "small", "large"), default="auto",
                   help="small: stem without stride/max-pool (28x28/32x32); auto: small when H <= 64")
    p.add_argument("--transform", default="illumination",
                   help="parametric name or 'a+b', 'pca', 'latent' (with --encoder/--decoder), 'precomputed'")
    p.add_argument("--strength", type=float, default=1.0, help="scales the transform's range")
    p.add_argument("--component", type=int, default=0, help="latent / PCA direction index")
    p.add_argument("--encoder", help="torch.export .pt2 encoder (latent)")
    p.add_argument("--decoder", help="torch.export .pt2 decoder (latent)")
    p.add_argument("--n", type=int, default=100, help="sampled transformations per repeat")
    p.add_argument("--l", type=int, default=10, help="repeats")
    p.add_argument("--alpha", type=float, default=0.9, help="CC-Cert confidence parameter alpha")
    p.add_argument("--epsilon", type=float, default=1e-3,
                   help="largest bound (a probability) for which a sample counts as certified")
    p.add_argument("--samples", type=int, default=100, help="test samples certified")
    p.add_argument("--t-min", type=float, default=1e-4, help="smallest t of the log grid")
    p.add_argument("--t-max", type=float, default=1e4, help="largest t of the log grid")
    p.add_argument("--t-steps", type=int, default=500, help="points of the t grid")
    p.add_argument("--batch-size", type=int, default=500, help="forward-pass batch")
    p.add_argument("--bound-order", choices=("conservative", "reference"), default="conservative",
                   help="min over t of max over repeats (conservative) or the reference code's order")
    add_bound_options(p)
    add_preprocess_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sampled transformations only (the train/test split has a fixed seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="certificate path (.json); evidence: <stem>.evidence.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_certify)

    v = subparsers.add_parser("verify", help="check a certificate against its evidence, model and mask",
                              description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("certificate", help="certificate .json")
    v.add_argument("--evidence", help="default: <stem>.evidence.npz (or evidence.npz for certificate.json)")
    v.add_argument("--model", help=f"weights file (default: {'model.safetensors'} beside the certificate)")
    v.add_argument("--mask", help="mask file (default: mask.safetensors beside the certificate)")
    v.add_argument("--no-files", action="store_true", help="check the evidence only (no model / mask files)")
    v.add_argument("--recompute", action="store_true",
                   help="also re-run the model on the recorded deltas and compare p and Z (tolerance 1e-6 "
                        "in fp32, 1e-2 in bf16), at the certificate's precision")
    v.add_argument("--dataset", help="--recompute: dataset reference overriding the certificate's "
                                     "(e.g. a local copy of a service artifact; its sha256 must match)")
    v.add_argument("--device", default="cpu", help="--recompute: cpu, cuda, ...")
    v.add_argument("--batch-size", type=int, default=500, help="--recompute: forward-pass batch")
    v.set_defaults(func=run_verify)


VERIFY_HELP = """Check a certificate: exit 0 when every check passes, 1 on a mismatch, 2 on unreadable input.

What it proves:
  1. The evidence file hashes to the certificate's evidence_sha256 (required), and every number of
     the certificate (margins, bounds, decisions, accuracy, PCA, failure probability,
     forward_passes) is recomputed from the evidence bit for bit; the deltas are those of the
     recorded seed; samples stopped early stopped for a valid reason (core/bounds.py).
  2. The model (and mask) files hash to model.sha256 (and mask_sha256), and the certificate's
     params / nonzero / sparsity / per-layer sparsity are those of the files. The files are
     model.safetensors / mask.safetensors beside the certificate, or --model / --mask.
  3. With --recompute: re-running that model on the dataset's test samples and the recorded deltas,
     at the certificate's params.precision (fp32 or bf16) and in its recorded form
     (software.forward), gives the evidence's p and Z within 1e-6 in fp32 (float32 forward passes
     differ across CPUs, GPUs, batch sizes and forms by about 1e-7) or 1e-2 in bf16; the dataset must
     hash to the certificate's dataset.sha256.

What it cannot prove:
  - Without --recompute, that the evidence came from this model: checks 1-2 hold for any evidence
    consistent with itself, whoever computed it.
  - That the guarantee holds: the bound is a statistical statement (see the certificate's
    "guarantee"), true with probability 1 - failure_probability per sample under its assumptions.
  - Anything about inputs or transformations other than the certified samples and T.
"""


def add_bound_options(p: argparse.ArgumentParser) -> None:
    """--bound, --failure-probability, --early-stop, --precision (shared by `certify` and `prune`)."""
    p.add_argument("--bound", choices=("cccert", "binomial"), default="cccert",
                   help="cccert: the paper's Eq. 13-14 (reproduction); binomial: one-sided Clopper-Pearson "
                        "upper limit on P(Z >= d), distribution-free, needs n*l >= ln(1/beta)/epsilon")
    p.add_argument("--failure-probability", type=float, default=1e-3, metavar="BETA",
                   help="beta of the binomial bound (default 1e-3)")
    p.add_argument("--early-stop", action="store_true",
                   help="stop sampling a sample once its decision cannot change (same decisions and PCA)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: certify the model as trained; bf16: as deployed in bf16 (bf16 autocast; "
                        "fast on CPUs with native bf16 and on GPUs, slow where bf16 is emulated)")


def add_preprocess_options(p: argparse.ArgumentParser) -> None:
    """--resize, --crop, --mean, --std (JobSpec.preprocess; shared by `certify` and `prune`)."""
    g = p.add_argument_group("preprocess", "resize / crop when the images are read; (x - mean) / std inside "
                             "the model, after the transformation T (which acts on raw [0, 1] images)")
    g.add_argument("--resize", type=int, help="scale the shorter image side to this many pixels (bilinear)")
    g.add_argument("--crop", type=int, help="central square crop of this side (default: --resize)")
    g.add_argument("--mean", help="channel means, comma-separated (e.g. 0.485,0.456,0.406)")
    g.add_argument("--std", help="channel standard deviations, comma-separated (e.g. 0.229,0.224,0.225)")


def preprocess_spec(args: argparse.Namespace):
    """--resize/--crop/--mean/--std -> core.spec.PreprocessSpec (InvalidInput on bad values)."""
    from pydantic import ValidationError

    from core.errors import InvalidInput
    from core.spec import PreprocessSpec

    def floats(text: str | None, name: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise InvalidInput(f"--{name} must be comma-separated numbers, got {text!r}") from None

    try:
        return PreprocessSpec(resize=args.resize, crop=args.crop, mean=floats(args.mean, "mean"),
                              std=floats(args.std, "std"))
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'preprocess'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid preprocess options: {msgs}") from None


def _specs(args: argparse.Namespace):
    from pydantic import ValidationError

    from core.errors import InvalidInput
    from core.spec import CertifySpec, TransformSpec

    name = args.transform
    if args.encoder or args.decoder or name == "latent":
        tkw = {"kind": "latent", "encoder": args.encoder, "decoder": args.decoder}
    elif name == "pca":
        tkw = {"kind": "latent"}
    elif name == "precomputed":
        tkw = {"kind": "precomputed"}
    else:
        tkw = {"kind": "parametric", "name": name}
    try:
        tspec = TransformSpec(component=args.component, strength=args.strength, **tkw)
        cspec = CertifySpec(n=args.n, l=args.l, alpha=args.alpha, epsilon=args.epsilon, samples=args.samples,
                            t_min=args.t_min, t_max=args.t_max, t_steps=args.t_steps,
                            bound_order=args.bound_order, batch_size=args.batch_size, bound=args.bound,
                            failure_probability=args.failure_probability, early_stop=args.early_stop,
                            precision=args.precision)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid certification options: {msgs}") from exc
    if args.seed < 0:
        raise InvalidInput("--seed must be >= 0")
    return tspec, cspec


def _model(args: argparse.Namespace, data, small: bool):
    """(model, arch name, model sha256, extra certificate fields) for --arch / --model."""
    from core.errors import InvalidInput
    from core.models import build_model, file_sha256, load_weights

    if (args.arch is None) == (args.model is None):
        raise InvalidInput("give exactly one of --arch (built-in architecture) and --model (.pt2 program)")
    if args.model is None:
        if args.weights is None:
            raise InvalidInput("--arch needs --weights")
        classes = args.num_classes or data.num_classes
        model = build_model(args.arch, classes, data.in_channels, small_input=small)
        load_weights(model, args.weights)
        return model, args.arch, file_sha256(args.weights), {}
    from core.program import ARCH, check_classifier, load_program_model

    model = load_program_model(args.model, args.weights)
    check_classifier(model, data.test_x, args.num_classes or data.num_classes)
    program_sha = file_sha256(args.model)
    sha = file_sha256(args.weights) if args.weights else program_sha
    return model, ARCH, sha, {"program_sha256": program_sha}


def run_certify(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from core.certify import build_certificate, certify_model, describe_model, write_certificate
    from core.context import LocalContext
    from core.data import load_dataset
    from core.errors import InvalidInput
    from core.masking import apply_masks_, load_masks
    from core.models import default_small_input, file_sha256
    from core.preprocess import attach_normalize, normalize_for, preprocess_dict
    from core.transforms import build_transform, transform_description
    from store.objects import objects_for

    tspec, cspec = _specs(args)
    pre = preprocess_spec(args)
    out = Path(args.out)
    data = load_dataset(args.dataset, seed=args.seed, resize=pre.resize, crop=pre.crop,
                        objects=objects_for(args.dataset))
    small = args.input_size == "small" or (
        args.input_size == "auto" and default_small_input(*data.test_x.shape[2:])
    )
    model, arch, model_sha, extra = _model(args, data, small)
    try:
        attach_normalize(model, normalize_for(pre, data.in_channels))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if preprocess_dict(pre):
        extra["preprocess"] = preprocess_dict(pre)
    masks, mask_sha = None, None
    if args.mask:
        masks = load_masks(args.mask)
        apply_masks_(model, masks)
        mask_sha = file_sha256(args.mask)
    transform = build_transform(tspec, data=data, split="test")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    samples = min(cspec.samples, int(data.test_x.shape[0]))
    work = out.parent / f".{out.stem}.work"
    bar = tqdm(total=samples, unit="sample", desc="certify", disable=args.quiet, file=sys.stderr)

    def on_progress(stage: str, fraction: float, message: str) -> None:
        bar.update(round(fraction * samples) - bar.n)

    ctx = LocalContext(work, on_progress=on_progress)
    try:
        result = certify_model(model, data.test_x, data.test_y, transform, cspec, seed=args.seed,
                               device=device, ctx=ctx)
    finally:
        bar.close()
    num_classes = args.num_classes or data.num_classes
    cert = build_certificate(
        result,
        model_info={**describe_model(model, arch, model_sha, masks), "num_classes": num_classes,
                    "in_channels": data.in_channels, "small_input": small, **extra},
        mask_sha256=mask_sha,
        dataset={"ref": data.ref, "sha256": data.sha256, "split_seed": data.split_seed, "train_subset": None},
        transform=transform_description(transform),
    )
    cert_path, ev_path = write_certificate(cert, result, out.parent, name=out.name)
    shutil.rmtree(work, ignore_errors=True)
    certified = sum(s["certified"] for s in result.samples)
    total = len(result.samples)
    print(f"accuracy {result.accuracy:.4f}  PCA {result.pca:.4f} ({certified}/{total} certified, "
          f"epsilon {cspec.epsilon:g})  failure probability {result.failure_probability:.3g}  "
          f"bound {result.params['bound']}  forward passes {result.forward_passes}  {result.seconds:.1f} s")
    print(f"certificate: {cert_path}\nevidence:    {ev_path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from core.certify import verify_certificate
    from core.verify import check_files, recompute
    from store.objects import objects_for

    cert = Path(args.certificate)
    evidence = Path(args.evidence) if args.evidence else None
    model, mask = (Path(p) if p else None for p in (args.model, args.mask))
    problems = verify_certificate(cert, evidence)
    checked = ["evidence"]
    if not args.no_files:
        problems += check_files(cert, model, mask)
        checked.append("model/mask files")
    if args.recompute:
        ref = args.dataset or (json.loads(cert.read_text()).get("dataset") or {}).get("ref")
        problems += recompute(cert, evidence, model=model, mask=mask, dataset=args.dataset,
                              device=args.device, batch_size=args.batch_size, objects=objects_for(ref))
        checked.append("recomputed p and Z")
    if problems:
        for msg in problems:
            print(f"MISMATCH {msg}")
        print(f"{args.certificate}: {len(problems)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"{args.certificate}: OK ({', '.join(checked)}): every number recomputed from the evidence matches")
    if not args.recompute:
        print("note: only --recompute ties the evidence to the model (see carcert verify --help)")
    return 0
