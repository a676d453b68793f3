"""`carcert submit | jobs | job | certificate | report | logs | cancel | delete | download`: client of a
running service.

Server and key: --url / --api-key, else the environment variables CARCERT_URL / CARCERT_API_KEY
(default URL http://127.0.0.1:8000). Exit codes: 0 ok; 1 the service answered an error, cannot be
reached, or the awaited job did not succeed; 2 bad input (spec file, flags, 400/422 answers)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from carcert.cli_certify import add_preprocess_options
from carcert.client import CarcertAPIError, CarcertClient, coerce_spec
from core.errors import InvalidInput
from core.methods import METHODS

DEFAULT_URL = "http://127.0.0.1:8000"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ARCHS = ("small_cnn", "resnet18", "mobilenet_v2", "googlenet")


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help=f"service URL (env CARCERT_URL, default {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="API key (env CARCERT_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds (default 60)")


def _job_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the job's id (from `carcert submit` or `carcert jobs`)")


def _job_tags(p: argparse.ArgumentParser) -> None:
    """submit's --name, --label, --webhook."""
    p.add_argument("--name", help="job name (1..200 characters)")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label; repeat for several"
    )
    p.add_argument("--webhook", metavar="URL", help="POST a signed JSON event here when the job ends")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit a job to a running service",
        description="Build a job spec (core.spec.JobSpec) from a JSON file and/or flags (flags win), "
        "upload local weight / mask files, POST /jobs. Prints the job JSON (or, with --wait, "
        "shows a progress bar and prints the final job).",
    )
    p.add_argument("spec", nargs="?", type=Path, help="JSON file with a JobSpec (optional)")
    p.add_argument("--kind", choices=("prune", "certify"), help="prune and certify, or certify only")
    p.add_argument("--arch", choices=ARCHS, help="built-in architecture (or --model)")
    p.add_argument(
        "--dataset", help="digits | fashion-mnist[:DIR] | imagefolder:PATH | npz:PATH | artifact:ID"
    )
    p.add_argument("--dataset-file", type=Path, help="local dataset archive to upload; sets --dataset")
    p.add_argument("--method", choices=METHODS, help="pruning method")
    p.add_argument("--methods", help="sweep: comma-separated methods")
    p.add_argument("--prune-ratio", type=float, help="share of the weights removed, in [0, 1)")
    p.add_argument("--prune-ratios", help="sweep: comma-separated prune ratios")
    p.add_argument(
        "--transform",
        help="NAME (parametric, e.g. brightness or gamma+blur), parametric:NAME, latent[:COMPONENT], "
        "precomputed",
    )
    p.add_argument("--strength", type=float, help="transform strength (scales the documented range)")
    p.add_argument("--weights", help="local weights file (uploaded first) or artifact:ID")
    p.add_argument(
        "--model",
        help="your own network: a local torch.export .pt2 (uploaded first as kind "
        "'model') or artifact:ID; replaces --arch",
    )
    p.add_argument("--mask", help="certify jobs: local mask file (uploaded first) or artifact:ID")
    p.add_argument("--pretrain-epochs", type=int, help="epochs of pretraining (0 with trained --weights)")
    p.add_argument("--search-epochs", type=int, help="epochs of the CAR / HYDRA mask search")
    p.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning under the hard mask")
    p.add_argument("--samples", type=int, help="number of test samples to certify")
    p.add_argument("--n", type=int, help="CC-Cert n")
    p.add_argument("--l", type=int, help="CC-Cert l")
    p.add_argument("--train-subset", type=int, help="train on a seeded random N training samples")
    p.add_argument("--seed", type=int, help="seeds training and the sampled transformations")
    add_preprocess_options(p)
    _job_tags(p)
    p.add_argument("--idempotency-key", help="default: a fresh random key (safe retries)")
    p.add_argument("--wait", action="store_true", help="show a live progress bar until the job ends")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    _connection(p)
    p.set_defaults(func=cmd_submit)

    _register_lifecycle(subparsers)

    p = subparsers.add_parser("job", help="show one job (optionally --wait for it)")
    _job_id(p)
    p.add_argument("--wait", action="store_true", help="show a live progress bar until the job ends")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    _connection(p)
    p.set_defaults(func=cmd_job)

    p = subparsers.add_parser("certificate", help="fetch a job's certificate JSON")
    _job_id(p)
    p.add_argument("--variant", help="one variant of a sweep, e.g. car-0.50")
    p.add_argument("--out", type=Path, help="write to this file instead of stdout")
    _connection(p)
    p.set_defaults(func=cmd_certificate)

    p = subparsers.add_parser("cancel", help="request cancellation of a job")
    _job_id(p)
    _connection(p)
    p.set_defaults(func=cmd_cancel)

    _register_download(subparsers)
    _register_report(subparsers)


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="print a signed link that opens a job's HTML report in a browser (no API key needed)",
        description="Ask the service for a signed, expiring link to the job's HTML report and print "
        "it; anyone holding the link can open the report until it expires, without an API key.",
    )
    _job_id(p)
    p.add_argument("--ttl", type=int, help="seconds the link stays valid (server default 7 days)")
    p.add_argument("--open", action="store_true", help="also open the link in the default browser")
    _connection(p)
    p.set_defaults(func=cmd_report)


def _register_download(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download",
        help="download a job's model, mask or evidence (sha256-checked)",
        description="Download a result file of a succeeded job; the sha256 the server announces is "
        "checked. model --format pt2|onnx: a deployable program (torch.export / ONNX) with the "
        "preprocessing and the certificate's sha256 in its metadata, exported on the first request.",
    )
    _job_id(p)
    p.add_argument("what", choices=("model", "mask", "evidence"), help="which file")
    p.add_argument("--variant", help="one variant of a sweep, e.g. car-0.50")
    p.add_argument(
        "--format",
        choices=("safetensors", "pt2", "onnx"),
        default="safetensors",
        help="model only: safetensors (weights), pt2 (torch.export program) or onnx",
    )
    p.add_argument("--out", type=Path, default=Path("."), help="file or folder (default .)")
    _connection(p)
    p.set_defaults(func=cmd_download)


def _register_lifecycle(subparsers: argparse._SubParsersAction) -> None:
    """`jobs` (list, --label filter), `logs`, `delete`."""
    p = subparsers.add_parser("jobs", help="list jobs of a running service")
    p.add_argument("--status", choices=STATUSES, help="only jobs in this state")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only jobs with this label (repeat: all)",
    )
    p.add_argument("--limit", type=int, default=None, help="show at most this many")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _connection(p)
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("logs", help="print a job's own log lines (GET /jobs/{id}/logs)")
    _job_id(p)
    p.add_argument("--json", action="store_true", help="the JSON document instead of text lines")
    _connection(p)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser(
        "delete",
        help="delete a finished job and the files it produced (a queued or running job: cancel it first)",
    )
    _job_id(p)
    _connection(p)
    p.set_defaults(func=cmd_delete)


# ----------------------------------------------------------------------------- helpers


def _client(args: argparse.Namespace) -> CarcertClient:
    url = args.url or os.environ.get("CARCERT_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("CARCERT_API_KEY")
    return CarcertClient(url, key, timeout=args.timeout)


def _fail(message: str, code: int = 1) -> int:
    print(f"carcert: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace, body) -> int:
    """Run body(client) mapping API / network errors to clear messages and exit codes."""
    try:
        with _client(args) as client:
            return body(client)
    except CarcertAPIError as exc:
        hint = " (set --api-key or CARCERT_API_KEY)" if exc.status == 401 else ""
        return _fail(f"{exc}{hint}", 2 if exc.status in (400, 413, 422) else 1)
    except httpx.TransportError as exc:
        url = args.url or os.environ.get("CARCERT_URL") or DEFAULT_URL
        return _fail(f"cannot reach the carcert service at {url}: {exc}")
    except InvalidInput as exc:
        return _fail(str(exc), 2)


def _csv(value: str, cast) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise InvalidInput(f"cannot parse list {value!r}: {exc}") from None


def _transform(value: str) -> dict[str, Any]:
    kind, _, rest = value.partition(":")
    if kind == "latent":
        try:
            return {"kind": "latent", "component": int(rest or 0)}
        except ValueError:
            raise InvalidInput(f"latent component must be an integer: {value!r}") from None
    if kind == "precomputed":
        return {"kind": "precomputed"}
    if kind == "parametric":
        return {"kind": "parametric", "name": rest}
    return {"kind": "parametric", "name": value}


def _is_local(ref: str | None) -> bool:
    return bool(ref) and not ref.startswith("artifact:") and Path(ref).is_file()


def build_spec_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSpec dict from the optional JSON file overlaid with the flags (no upload yet)."""
    spec: dict[str, Any] = {}
    if args.spec is not None:
        try:
            spec = json.loads(Path(args.spec).read_text())
        except FileNotFoundError:
            raise InvalidInput(f"spec file not found: {args.spec}") from None
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"spec file {args.spec} is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise InvalidInput(f"spec file {args.spec} must hold a JSON object")

    def section(name: str) -> dict[str, Any]:
        value = spec.setdefault(name, {})
        if not isinstance(value, dict):
            raise InvalidInput(f"spec field {name!r} must be an object")
        return value

    if args.kind:
        spec["kind"] = args.kind
    if args.arch:
        section("model")["arch"] = args.arch
    if args.weights:
        section("model")["weights"] = args.weights
    if getattr(args, "model", None):
        section("model")["program"] = args.model
    if args.dataset:
        spec["dataset"] = args.dataset
    if args.mask:
        spec["mask"] = args.mask
    if args.transform:
        section("transform").update(_transform(args.transform))
    if args.strength is not None:
        section("transform")["strength"] = args.strength
    for flag, key in (
        ("method", "method"),
        ("prune_ratio", "prune_ratio"),
        ("pretrain_epochs", "pretrain_epochs"),
        ("search_epochs", "search_epochs"),
        ("finetune_epochs", "finetune_epochs"),
    ):
        if getattr(args, flag) is not None:
            section("pruning")[key] = getattr(args, flag)
    for flag in ("samples", "n", "l"):
        if getattr(args, flag) is not None:
            section("certification")[flag] = getattr(args, flag)
    if args.methods:
        spec["sweep_methods"] = _csv(args.methods, str)
    if args.prune_ratios:
        spec["sweep_prune_ratios"] = _csv(args.prune_ratios, float)
    if args.train_subset is not None:
        spec["train_subset"] = args.train_subset
    _preprocess_flags(args, section)
    if args.seed is not None:
        spec["seed"] = args.seed
    if getattr(args, "name", None):
        spec["name"] = args.name
    if getattr(args, "label", None):
        spec["labels"] = {**(spec.get("labels") or {}), **parse_labels(args.label)}
    if getattr(args, "webhook", None):
        spec["webhook"] = {"url": args.webhook}
    return spec


def _preprocess_flags(args: argparse.Namespace, section) -> None:
    """--resize/--crop/--mean/--std into the spec's `preprocess` block (given flags only)."""
    for flag in ("resize", "crop"):
        if getattr(args, flag, None) is not None:
            section("preprocess")[flag] = getattr(args, flag)
    for flag in ("mean", "std"):
        if getattr(args, flag, None) is not None:
            section("preprocess")[flag] = _csv(getattr(args, flag), float)


def parse_labels(items: list[str]) -> dict[str, str]:
    """['k=v', 'team=a'] -> {'k': 'v', 'team': 'a'} (InvalidInput on an item without '=')."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _labels_text(job: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (job.get("labels") or {}).items()) or "-"


def _progress_bar(job_id: str):
    """A tqdm bar (0..100 %) whose description is the current stage, followed by the variant(s) the
    job is on and an ETA (carcert.progress); returns (callback, bar)."""
    from tqdm import tqdm

    from carcert.progress import EtaClock

    bar = tqdm(
        total=100,
        desc="queued",
        unit="%",
        bar_format="{desc:<24} {percentage:3.0f}%|{bar}| {elapsed} {postfix}",
        file=sys.stderr,
    )
    clock = EtaClock()

    def update(job: dict) -> None:
        bar.set_description_str(f"{job.get('status')}:{job.get('stage') or '-'}"[:24])
        bar.set_postfix_str(clock.text(job)[:60], refresh=False)
        target = round(100 * float(job.get("progress") or 0.0), 1)
        bar.update(max(0.0, target - bar.n))

    return update, bar


def _wait(client: CarcertClient, job_id: str, poll: float) -> int:
    """--wait: live progress bar until the job ends; Ctrl-C leaves the job running (says so)."""
    update, bar = _progress_bar(job_id)
    try:
        final = client.wait(job_id, on_progress=update, poll=poll)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\njob {job_id} keeps running on the server; stop it with: carcert cancel {job_id}",
            file=sys.stderr,
        )
        raise
    bar.close()
    return _finish(final)


def _finish(job: dict) -> int:
    print(json.dumps(job, indent=2))
    if job.get("status") == "succeeded":
        return 0
    err = job.get("error") or {}
    detail = f": {err.get('title')}: {err.get('detail')}" if err else ""
    return _fail(f"job {job.get('id')} {job.get('status')}{detail}")


# ----------------------------------------------------------------------------- commands


def cmd_submit(args: argparse.Namespace) -> int:
    spec = build_spec_dict(args)
    coerce_spec(spec)  # fail on a bad spec before uploading anything

    def body(client: CarcertClient) -> int:
        model = spec.get("model") or {}
        if _is_local(model.get("weights")):
            art = client.upload_artifact(model["weights"], "weights")
            print(f"uploaded {model['weights']} -> artifact:{art['id']}", file=sys.stderr)
            model["weights"] = f"artifact:{art['id']}"
        if _is_local(model.get("program")):
            art = client.upload_artifact(model["program"], "model")
            print(f"uploaded {model['program']} -> artifact:{art['id']}", file=sys.stderr)
            model["program"] = f"artifact:{art['id']}"
        if _is_local(spec.get("mask")):
            art = client.upload_artifact(spec["mask"], "other")
            print(f"uploaded {spec['mask']} -> artifact:{art['id']}", file=sys.stderr)
            spec["mask"] = f"artifact:{art['id']}"
        if args.dataset_file is not None:
            art = client.upload_artifact(args.dataset_file, "dataset")
            print(f"uploaded {args.dataset_file} -> artifact:{art['id']}", file=sys.stderr)
            spec["dataset"] = f"artifact:{art['id']}"
        key = args.idempotency_key or uuid.uuid4().hex
        job = client.submit(spec, idempotency_key=key)
        if not args.wait:
            print(json.dumps(job, indent=2))
            return 0
        print(f"job {job['id']} submitted", file=sys.stderr)
        return _wait(client, job["id"], args.poll)

    return _run(args, body)


def cmd_jobs(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        page = min(args.limit, 100) if args.limit else 100
        labels = parse_labels(args.label)
        if not args.json:
            print(
                f"{'id':<32}  {'status':<10} {'stage':<16} {'progress':>8}  {'created_at':<25} name  labels"
            )
        for shown, job in enumerate(client.list_jobs(status=args.status, limit=page, labels=labels)):
            if args.limit is not None and shown >= args.limit:
                break
            if args.json:
                print(json.dumps(job))
            else:
                prog = f"{100 * float(job.get('progress') or 0):.0f}%"
                print(
                    f"{job['id']:<32}  {job['status']:<10} {(job.get('stage') or '-')[:16]:<16} "
                    f"{prog:>8}  {job.get('created_at', '')[:25]:<25} "
                    f"{job.get('name') or '-'}  {_labels_text(job)}"
                )
        return 0

    return _run(args, body)


def cmd_job(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        if not args.wait:
            print(json.dumps(client.get_job(args.job_id), indent=2))
            return 0
        return _wait(client, args.job_id, args.poll)

    return _run(args, body)


def cmd_certificate(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        cert = client.certificate(args.job_id, variant=args.variant)
        text = json.dumps(cert, indent=2)
        if args.out is None:
            print(text)
        else:
            args.out.write_text(text + "\n")
            print(f"wrote {args.out}", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_cancel(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        job = client.cancel(args.job_id)
        print(f"job {job.get('id', args.job_id)}: {job.get('status')} (cancel requested)")
        return 0

    return _run(args, body)


def cmd_download(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        if args.format != "safetensors" and args.what != "model":
            return _fail("--format applies to 'model' only", 2)
        if args.what == "model":
            path = client.download_model(args.job_id, args.out, variant=args.variant, format=args.format)
        else:
            fetch = {"mask": client.download_mask, "evidence": client.download_evidence}[args.what]
            path = fetch(args.job_id, args.out, variant=args.variant)
        print(f"wrote {path} (sha256 verified)", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_report(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        link = client.report_link(args.job_id, ttl=args.ttl)
        print(link["url"])
        print(f"valid until {link['expires_at']}", file=sys.stderr)
        if args.open:
            import webbrowser

            if not webbrowser.open(link["url"]):
                print("no browser found; open the link above yourself", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_logs(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        doc = client.logs(args.job_id)
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        for line in doc.get("lines", []):
            print(f"{line['created_at'][:23]} {line['level']:<7} {line['message']}")
        return 0

    return _run(args, body)


def cmd_delete(args: argparse.Namespace) -> int:
    def body(client: CarcertClient) -> int:
        client.delete(args.job_id)
        print(f"job {args.job_id} deleted")
        return 0

    return _run(args, body)
