"""`carcert certify` (CC-Cert certificate of a trained, optionally masked model) and `carcert verify`
(recompute every bound of a certificate from its evidence; exit 1 on any mismatch).

    carcert certify --arch resnet18 --weights model.safetensors [--mask mask.safetensors] \\
        --dataset digits --transform illumination [--n 100 --l 10 --alpha 0.9 --epsilon 1e-3 \\
        --samples 100 --seed 0 --bound-order conservative] --out cert.json
    carcert certify --model net.pt2 [--weights W] [--mask M] --dataset digits ... --out cert.json
writes cert.json and cert.evidence.npz beside it. --transform takes a parametric name
(core.transforms.PARAMETRIC, or 'a+b'), 'pca' (built-in PCA latent direction, --component),
'latent' with --encoder/--decoder .pt2 files, or 'precomputed' (variants shipped in an npz).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--l", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--t-min", type=float, default=1e-4)
    p.add_argument("--t-max", type=float, default=1e4)
    p.add_argument("--t-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=500, help="forward-pass batch")
    p.add_argument("--bound-order", choices=("conservative", "reference"), default="conservative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="certificate path (.json); evidence: <stem>.evidence.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_certify)

    v = subparsers.add_parser("verify", help="recompute a certificate's bounds from its evidence")
    v.add_argument("certificate", help="certificate .json")
    v.add_argument("--evidence", help="default: <stem>.evidence.npz (or evidence.npz for certificate.json)")
    v.set_defaults(func=run_verify)


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
                            bound_order=args.bound_order, batch_size=args.batch_size)
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
    from core.masking import apply_masks_, load_masks
    from core.models import default_small_input, file_sha256
    from core.transforms import build_transform, transform_description

    tspec, cspec = _specs(args)
    out = Path(args.out)
    data = load_dataset(args.dataset, seed=args.seed)
    small = args.input_size == "small" or (
        args.input_size == "auto" and default_small_input(*data.test_x.shape[2:])
    )
    model, arch, model_sha, extra = _model(args, data, small)
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
    cert = build_certificate(
        result,
        model_info={**describe_model(model, arch, model_sha, masks), **extra},
        mask_sha256=mask_sha,
        dataset={"ref": data.ref, "sha256": data.sha256},
        transform=transform_description(transform),
    )
    cert_path, ev_path = write_certificate(cert, result, out.parent, name=out.name)
    shutil.rmtree(work, ignore_errors=True)
    certified = sum(s["certified"] for s in result.samples)
    total = len(result.samples)
    print(f"accuracy {result.accuracy:.4f}  PCA {result.pca:.4f} ({certified}/{total} certified, "
          f"epsilon {cspec.epsilon:g})  failure probability {result.failure_probability:.3g}  "
          f"bound order {result.bound_order}  {result.seconds:.1f} s")
    print(f"certificate: {cert_path}\nevidence:    {ev_path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from core.certify import verify_certificate

    problems = verify_certificate(Path(args.certificate), Path(args.evidence) if args.evidence else None)
    if problems:
        for msg in problems:
            print(f"MISMATCH {msg}")
        print(f"{args.certificate}: {len(problems)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"{args.certificate}: OK, every bound recomputed from the evidence matches")
    return 0
