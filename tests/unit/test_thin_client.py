"""`pip install carcert` is the thin client: its wheel metadata requires no torch, Celery or SQL,
the CLI's module-level import graph reaches none of them, and the client commands run (and the
others say which extra they need) in a subprocess where those packages cannot be imported.
The same commands against a real server: tests/integration/test_thin_client.py."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest

from tests.thin_client import BLOCKED, ROOT, blocker_dir, run_thin_cli

HEAVY = {"torch", "torchvision", "numpy", "scipy", "scikit-learn", "safetensors", "matplotlib",
         "celery", "redis", "sqlalchemy", "alembic", "psycopg", "fastapi", "uvicorn"}  # fmt: skip


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> dict[str | None, list[str]]:
    """Requires-Dist of the wheel setuptools would build from pyproject.toml, by extra (None: base)."""
    out = tmp_path_factory.mktemp("wheel-metadata")
    code = (
        "import sys; from setuptools import build_meta as b; "
        "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    meta = Parser().parsestr((out / done.stdout.strip().splitlines()[-1] / "METADATA").read_text())
    by_extra: dict[str | None, list[str]] = {}
    for req in meta.get_all("Requires-Dist"):
        found = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        by_extra.setdefault(found.group(1) if found else None, []).append(_requirement_name(req))
    return by_extra


def test_base_requirements_are_the_thin_client(metadata):
    assert sorted(metadata[None]) == ["httpx", "pydantic", "tqdm"]
    assert not HEAVY & set(metadata[None])


def test_the_extras_bring_the_rest(metadata):
    assert {"torch", "torchvision", "numpy", "scipy", "safetensors"} <= set(metadata["core"])
    assert {"carcert", "celery", "sqlalchemy", "alembic", "psycopg"} <= set(metadata["worker"])
    assert {"carcert", "fastapi", "uvicorn", "prometheus-client"} <= set(metadata["server"])
    for kept in ("s3", "export", "mlflow", "dev"):
        assert metadata[kept], kept


def _module_level_imports(path: Path) -> set[str]:
    """Dotted names imported at module level (also inside top-level try/if, not in functions)."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Try | ast.If):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
    return names


def test_importing_the_cli_reaches_no_heavy_package_at_module_level():
    """Walk the project modules `carcert.cli` loads on start (module-level imports, transitively)."""
    seen, todo, external = set(), ["carcert.cli"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for path in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
            if path.is_file():
                break
        else:
            continue
        package = ".".join(parts[:-1])
        if package:
            todo.append(package)
        for name in _module_level_imports(path):
            if name.split(".")[0] in {"core", "carcert", "api", "worker", "store"}:
                todo.append(name)
            else:
                external.add(name.split(".")[0])
    assert {"carcert.cli", "carcert.cli_client", "carcert.client", "core.spec"} <= seen
    assert not {"store", "worker", "api"} & {m.split(".")[0] for m in seen}
    assert not external & set(BLOCKED), sorted(external & set(BLOCKED))


def test_blocker_really_blocks(tmp_path):
    """The harness itself: with the blocker, `import torch` fails in the subprocess."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={"PYTHONPATH": str(blocker_dir(tmp_path))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "blocked" in done.stderr


def test_client_commands_run_without_torch_and_say_which_extra_others_need(tmp_path):
    assert run_thin_cli(["--help"], tmp_path).returncode == 0
    for command in ("submit", "job", "jobs", "certificate", "download", "logs", "report", "cancel", "delete"):
        done = run_thin_cli([command, "--help"], tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    # a spec is validated locally (core.spec, pydantic only), then the unreachable server is reported
    done = run_thin_cli(
        ["submit", "--arch", "small_cnn", "--dataset", "digits", "--url", "http://127.0.0.1:9"], tmp_path
    )
    assert done.returncode == 1 and "cannot reach the carcert service" in done.stderr, done.stderr
    done = run_thin_cli(["submit", "--dataset", "digits", "--n", "0", "--url", "http://[::1]:9"], tmp_path)
    assert done.returncode == 2 and "certification.n" in done.stderr, done.stderr
    done = run_thin_cli(["prune", "--arch", "small_cnn", "--dataset", "digits", "--out", "x"], tmp_path)
    assert done.returncode == 2 and "pip install 'carcert[core]'" in done.stderr, done.stderr
    done = run_thin_cli(["keys", "list"], tmp_path)
    assert done.returncode == 2 and "pip install 'carcert[worker]'" in done.stderr, done.stderr
