"""Run the `carcert` CLI as a thin-client install would: in a subprocess where importing the heavy
packages (torch, numpy, Celery, SQLAlchemy, FastAPI, ...) raises ModuleNotFoundError, as on an
install without them. A `sitecustomize` module placed first on PYTHONPATH installs a meta-path
finder that refuses them before carcert runs, so any import of them, at the top or inside a
function, fails the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What `pip install carcert` (no extra) does not bring; the extras of pyproject.toml do.
BLOCKED = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "sklearn",
    "safetensors",
    "matplotlib",
    "celery",
    "kombu",
    "redis",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "pydantic_settings",
    "fastapi",
    "uvicorn",
    "prometheus_client",
)

SITECUSTOMIZE = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class ThinClientBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            msg = f"No module named {{name!r}} (blocked: not in the thin client)"
            raise ModuleNotFoundError(msg, name=name)
        return None
sys.meta_path.insert(0, ThinClientBlocker())
"""


def blocker_dir(tmp: Path) -> Path:
    """A folder holding the blocking sitecustomize.py (to put first on PYTHONPATH)."""
    folder = tmp / "thin-site"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def run_thin_cli(
    args: list[str], tmp: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m carcert.cli ARGS` with the heavy packages blocked; cwd is `tmp`."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(blocker_dir(tmp)), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "carcert.cli", *args],
        cwd=tmp,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
