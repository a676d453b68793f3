"""The `carcert` command line as a reader of --help sees it: every sub-command and every option has a
help text and every option with a default shows it; `carcert up` on a busy port fails before it
says it is up; `carcert submit`'s preprocess flags land in the spec it submits."""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import subprocess
import sys

import pytest

from carcert.cli import all_parsers, build_parser
from carcert.cli_client import build_spec_dict
from carcert.client import coerce_spec
from core.errors import InvalidInput
from tests.thin_client import ROOT


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


def test_every_subcommand_has_help_and_a_description_or_help_line():
    parsers = all_parsers(build_parser())
    names = {p.prog for p in parsers}
    assert {"carcert submit", "carcert up", "carcert keys revoke", "carcert download"} <= names
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {a.dest: a.help for a in action._choices_actions}
                assert set(listed) == set(action.choices), parser.prog
                assert all(listed.values()), f"{parser.prog}: sub-commands without help: {listed}"


@pytest.mark.parametrize("parser", all_parsers(build_parser()), ids=lambda p: p.prog)
def test_every_option_has_help_and_shows_its_default(parser):
    formatter = parser._get_formatter()
    for action in _options(parser):
        assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
        rendered = " ".join(formatter._format_action(action).split())
        default = action.default
        if action.option_strings and default not in (None, False, "", [], argparse.SUPPRESS):
            assert _states_default(rendered, default), (parser.prog, rendered)


def _states_default(rendered: str, default: object) -> bool:
    """The help says "default" followed by the value (a number may be spelled 1e-3 for 0.001)."""
    _, found, after = rendered.partition("default")
    if not found:
        return False
    if str(default) in after:
        return True
    if isinstance(default, int | float):
        for token in re.findall(r"[-+0-9.e]+", after):
            with contextlib.suppress(ValueError):
                if float(token) == float(default):
                    return True
    return False


def test_defaults_appear_in_the_rendered_help_text():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["certify"].format_help().split())
    assert "--t-min T_MIN smallest t of the log grid (default: 0.0001)" in text
    assert "--epsilon EPSILON largest bound (a probability) for which a sample counts as certified " \
           "(default: 0.001)" in text  # fmt: skip
    assert "(default: 0.001) (default" not in text


def test_up_on_a_busy_port_fails_before_saying_it_is_up(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        up = ["up", "--port", str(port), "--data-dir", str(tmp_path / "v")]
        done = subprocess.run(
            [sys.executable, "-m", "carcert.cli", *up],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "is up" not in done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert not (tmp_path / "v").exists()  # nothing was started or created


def _submit_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", *argv])


def test_submit_preprocess_flags_go_into_the_spec(tmp_path):
    spec = build_spec_dict(
        _submit_args(
            "--dataset", "digits", "--resize", "12", "--crop", "10",
            "--mean", "0.5", "--std", "0.25",
        )  # fmt: skip
    )
    assert spec["preprocess"] == {"resize": 12, "crop": 10, "mean": [0.5], "std": [0.25]}
    assert coerce_spec(spec).preprocess.model_dump() == spec["preprocess"]
    # a spec file's preprocess block is kept where no flag overrides it
    path = tmp_path / "spec.json"
    path.write_text('{"dataset": "digits", "preprocess": {"resize": 16, "mean": [0.1, 0.2, 0.3], '
                    '"std": [1, 1, 1]}}')  # fmt: skip
    spec = build_spec_dict(_submit_args(str(path), "--crop", "14"))
    assert spec["preprocess"] == {"resize": 16, "crop": 14, "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}


def test_submit_preprocess_flags_are_checked():
    with pytest.raises(InvalidInput, match="cannot parse list"):
        build_spec_dict(_submit_args("--dataset", "digits", "--mean", "a,b", "--std", "1,1"))
    with pytest.raises(InvalidInput, match="give mean and std together"):
        coerce_spec(build_spec_dict(_submit_args("--dataset", "digits", "--mean", "0.5")))
