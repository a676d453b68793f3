"""`carcert export DIR --format pt2|onnx`: the deployable model of a `carcert prune` result folder.

Reads DIR/model.safetensors, DIR/metrics.json, DIR/certificate.json (and DIR/model.pt2 for a
--model program) and writes DIR/model.<format> (or --out): a torch.export program or an ONNX graph
carrying the preprocessing and the certificate's sha256 as metadata (core.deploy). The service
offers the same files at GET /jobs/{id}/model?format=pt2|onnx."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import InvalidInput


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a result folder's model as a torch.export .pt2 or an ONNX file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="a result folder of carcert prune (holds model.safetensors)")
    p.add_argument("--format", choices=("pt2", "onnx"), default="onnx", help="output format (default: onnx)")
    p.add_argument("--out", type=Path, help="output file (default: FOLDER/model.<format>)")
    p.set_defaults(func=cmd_export)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from core.deploy import export_deployable

    folder: Path = args.folder
    weights, metrics = folder / "model.safetensors", _read_json(folder / "metrics.json")
    if not weights.is_file() or metrics is None:
        raise InvalidInput(f"{folder} holds no model.safetensors and metrics.json (a carcert prune result?)")
    program = folder / "model.pt2" if metrics.get("arch") == "program" else None
    if program is not None and not program.is_file():
        raise InvalidInput(f"{folder} is the result of a --model program but has no model.pt2")
    if program is not None and args.format == "pt2":
        raise InvalidInput(f"{program} is the pruned program already (the certificate names its sha256)")
    out = args.out or folder / f"model.{args.format}"
    sha = export_deployable(
        args.format,
        out,
        weights=weights,
        metrics=metrics,
        certificate=_read_json(folder / "certificate.json"),
        program=program,
    )
    print(f"wrote {out} (sha256 {sha})", file=sys.stderr)
    return 0
