"""Run deployable models (core.deploy) the way a consumer would: the .pt2 in a fresh isolated
interpreter that imports torch only (carcert's packages are blocked), the .onnx with onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

PT2_ALONE = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("core", "carcert", "api", "worker", "store", "tests"):
            raise ImportError(f"{name} is blocked: the program must load without carcert")
sys.meta_path.insert(0, Block())
import numpy as np, torch
extra = {"carcert.json": ""}
net = torch.export.load(sys.argv[1], extra_files=extra).module()
x = torch.from_numpy(np.load(sys.argv[2]))
np.save(sys.argv[3], net(x).detach().numpy())
print(extra["carcert.json"])
"""


def run_pt2_alone(pt2: Path, x: np.ndarray, tmp: Path) -> tuple[np.ndarray, str]:
    """Logits of `pt2` on `x` from `python -I` in an empty folder with carcert blocked, and the
    archive's carcert.json text."""
    work = tmp / "alone"
    work.mkdir(exist_ok=True)
    np.save(work / "x.npy", x.astype(np.float32))
    out = subprocess.run(
        [sys.executable, "-I", "-c", PT2_ALONE, str(Path(pt2).resolve()), "x.npy", "y.npy"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return np.load(work / "y.npy"), out.stdout.strip()


def run_onnx(path: Path, x: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """Logits of the ONNX model on `x` (onnxruntime, CPU) and its metadata_props."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    logits = session.run(None, {inp.name: x.astype(np.float32)})[0]
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return logits, meta
