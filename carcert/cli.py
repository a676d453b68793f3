"""`carcert` command line. Each command group lives in its own module exposing
`register(subparsers)`; each registered parser sets `func(args) -> int` (the exit code)."""

from __future__ import annotations

import argparse
import sys

from carcert import cli_certify, cli_client, cli_deploy, cli_export, cli_prune, cli_service

# Top-level packages of the extras (pyproject.toml): `pip install carcert` is the thin client; a
# command that needs more says which extra to install instead of showing a traceback.
EXTRA_PACKAGES = {
    "core": ("torch", "torchvision", "numpy", "safetensors", "sklearn", "scipy", "matplotlib"),
    "worker": ("celery", "kombu", "redis", "sqlalchemy", "alembic", "psycopg", "pydantic_settings"),
    "server": ("fastapi", "fastapi_offline", "uvicorn", "multipart", "prometheus_client"),
}
EXTRA_OF = {package: extra for extra, packages in EXTRA_PACKAGES.items() for package in packages}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The pyproject extra that provides the module `exc` could not import, if it is one of ours."""
    return EXTRA_OF.get((exc.name or "").split(".")[0])


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help already
    states it in words or there is none to show (no value, a flag, an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, "", [], argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every sub-command parser below it, depth first."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out.extend(all_parsers(child))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carcert",
        description="Prune image classifiers with CAR and certify them against semantic "
        "perturbations (CC-Cert). `carcert COMMAND --help` shows each command's options and defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cli_prune, cli_certify, cli_service, cli_client, cli_deploy, cli_export):
        module.register(sub)
    for each in all_parsers(parser):
        each.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import InvalidInput

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InvalidInput as exc:
        print(f"carcert: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(
            f"carcert: error: `carcert {args.command}` needs {exc.name!r}, which the thin client does "
            f"not install: pip install 'carcert[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("carcert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
