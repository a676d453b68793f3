"""`carcert` command line. Each command group lives in its own module exposing
`register(subparsers)`; each registered parser sets `func(args) -> int` (the exit code)."""

from __future__ import annotations

import argparse
import sys

from carcert import cli_certify, cli_client, cli_deploy, cli_export, cli_prune, cli_service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carcert",
        description="Prune image classifiers with CAR and certify them against semantic "
        "perturbations (CC-Cert).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cli_prune, cli_certify, cli_service, cli_client, cli_deploy, cli_export):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import InvalidInput

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InvalidInput as exc:
        print(f"carcert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carcert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
