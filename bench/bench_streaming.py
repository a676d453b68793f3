"""Streaming datasets: peak memory and wall time of `carcert certify` and a 1-epoch `carcert prune` on
generated imagefolders of JPEGs, and training throughput on digits / Fashion-MNIST.

    python bench/bench_streaming.py --sizes 6000 60000 [--code /work/main] [--skip-prune]

Folders: var/bench-stream/jpeg-<N>/<class>/<i>.jpg (160 x 160 RGB, 10 classes, smooth random
content, JPEG quality 90; generated once, seeded). Every command runs in a child process; peak RSS
is the largest sum of VmRSS over the child and its descendants (DataLoader workers included),
sampled every 50 ms from /proc, beside ru_maxrss (the largest single process). The prune runs train
with --batch-size 16 (PRUNE_BATCH). `--code DIR` runs the
commands with DIR's carcert (e.g. /work/main, the in-memory path) for comparison. Results print as
JSON lines and a markdown table; run it under `flock /tmp/carcert-bench.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CPUINFO = Path("/proc/cpuinfo")
VAR = ROOT / "var" / "bench-stream"
SIDE, CLASSES = 160, 10
PRUNE_BATCH = 16  # training batch of the prune runs: at 160 px activations, not the dataset, set the
# memory of a step (small_cnn, one training step: 1.54 GB peak RSS at batch 32, 1.32 GB at 16)


def generate(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs (SIDE px, CLASSES classes) under folder/<class>/, each a bilinear upsampling of a
    seeded 8x8 colour grid tinted by its class (about 5-15 kB each). Skipped when complete."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return folder
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, size=(CLASSES, 3))
    for i in range(n):
        c = i % CLASSES
        d = folder / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        grid = np.clip(rng.integers(0, 256, size=(8, 8, 3)) * 0.5 + tints[c] * 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(grid).resize((SIDE, SIDE), Image.BILINEAR).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(str(n))
    return folder


def _tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        pids.append(p)
    return pids


def _sum_field(pids: list[int], file: str, field: str) -> int:
    """Sum of `field` (kB) of /proc/<pid>/<file> over pids (VmRSS in status, Pss in smaps_rollup).
    RSS counts a page shared by a parent and its DataLoader workers (the torch libraries) once per
    process; PSS splits it between them, so the PSS sum is the tree's real footprint."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/{file}") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith(field)), 0)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list[str], code: Path, time_limit: float | None = None) -> dict:
    """Run cmd with PYTHONPATH=code: {seconds, peak_tree_rss_mb, peak_tree_pss_mb, maxrss_mb, rc,
    stopped}. With time_limit, the command's process group is sent SIGTERM after that many seconds
    (stopped: true; the peaks cover the part that ran)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    peak = peak_pss = polls = 0
    stopped = False
    while True:
        # RSS every 50 ms; PSS (smaps_rollup walks the page tables: ~0.4 of a core at 50 ms) every 1 s
        pids = _tree_pids(proc.pid)
        peak = max(peak, _sum_field(pids, "status", "VmRSS:"))
        if polls % 20 == 0:
            peak_pss = max(peak_pss, _sum_field(pids, "smaps_rollup", "Pss:"))
        polls += 1
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time_limit is not None and not stopped and time.perf_counter() - t0 > time_limit:
            os.killpg(proc.pid, signal.SIGTERM)
            stopped = True
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 and not stopped:
        print(out[-3000:], file=sys.stderr)
    return {
        "seconds": round(seconds, 2),
        "peak_tree_rss_mb": round(peak / 1024),
        "peak_tree_pss_mb": round(peak_pss / 1024),
        "maxrss_mb": round(usage.ru_maxrss / 1024),
        "rc": rc,
        "stopped": stopped,
        "tail": out.strip().splitlines()[-2:] if out.strip() else [],
    }


def weights(path: Path) -> Path:
    """A seeded small_cnn for 3 x SIDE x SIDE inputs and CLASSES classes (what certify loads)."""
    if not path.is_file():
        import torch

        from core.models import build_model, save_weights

        torch.manual_seed(0)
        save_weights(build_model("small_cnn", CLASSES, 3), path)
    return path


def commands(
    folder: Path, w: Path, out: Path, skip_prune: bool, nl: tuple[int, int] = (100, 10)
) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "certify": [
            py,
            "-m",
            "carcert.cli",
            "certify",
            "--arch",
            "small_cnn",
            "--weights",
            str(w),
            "--dataset",
            f"imagefolder:{folder}",
            "--samples",
            "4",
            "--n",
            str(nl[0]),
            "--l",
            str(nl[1]),
            "--out",
            str(out / "cert.json"),
            "--quiet",
            "--device",
            "cpu",
        ],
    }
    if not skip_prune:
        cmds["prune"] = [
            py,
            "-m",
            "carcert.cli",
            "prune",
            "--arch",
            "small_cnn",
            "--dataset",
            f"imagefolder:{folder}",
            "--method",
            "car",
            "--prune-ratio",
            "0.5",
            "--epochs",
            "1",
            "--batch-size",
            str(PRUNE_BATCH),
            "--samples",
            "4",
            "--out",
            str(out / "prune"),
            "--quiet",
            "--device",
            "cpu",
        ]
    return cmds


THROUGHPUT = """
import json, sys, time, torch
from core.data import load_dataset
from core.models import build_model
from core.training import train_epochs
torch.set_num_threads(2)
ref, n, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = load_dataset(ref, train_subset=n)
torch.manual_seed(0)
model = build_model("small_cnn", data.num_classes, data.in_channels)
# one-time costs outside the timing, paid the same by every code version: the first optimizer
# imports torch._dynamo (~2 s here), whatever imported it earlier or not
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
t0, c0 = time.perf_counter(), time.process_time()
train_epochs(model, data.train_x, data.train_y, epochs=epochs, lr=0.01, batch_size=128, seed=0)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
n_img = epochs * len(data.train_y)
# img per CPU second (both threads' time) moves less than wall img/s when something else runs
print(json.dumps({"img_per_s": round(n_img / dt, 1), "img_per_cpu_s": round(n_img / cpu, 1),
                  "seconds": round(dt, 2)}))
"""


def throughput(ref: str, n: int, code: Path, epochs: int = 1) -> dict:
    """img/s of `epochs` epochs of small_cnn training (batch 128, 2 threads) on n samples of ref,
    with code's core (its in-memory or streaming data path)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    res = subprocess.run(
        [sys.executable, "-c", THROUGHPUT, ref, str(n), str(epochs)],
        env=env,
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[6000, 60000])
    ap.add_argument("--prune-sizes", type=int, nargs="*", help="folder sizes also pruned (default: --sizes)")
    ap.add_argument("--skip-certify", action="store_true")
    ap.add_argument("--n", type=int, default=100, help="certify: draws per repeat (default 100, the CLI's)")
    ap.add_argument("--l", type=int, default=10, help="certify: repeats (default 10, the CLI's)")
    ap.add_argument(
        "--fashion-subset", type=int, default=60000, help="throughput: Fashion-MNIST training samples"
    )
    ap.add_argument(
        "--code", type=Path, default=ROOT, help="repository whose carcert runs (default: this one)"
    )
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument(
        "--prune-time-limit",
        type=float,
        default=None,
        help="stop each prune after this many seconds (its peaks cover the part that ran)",
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command (the table shows each)")
    a = ap.parse_args()
    VAR.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    w = weights(VAR / "small_cnn-160.safetensors")
    load = os.getloadavg()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in CPUINFO.read_text().splitlines() if "model name" in ln), ""
    )
    print(
        f"# machine {cpu or platform.machine()}, {os.cpu_count()} CPUs; code {a.code}; "
        f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    rows = []
    for n in a.sizes:
        folder = generate(VAR / f"jpeg-{n}", n)
        skip_prune = a.skip_prune or (a.prune_sizes is not None and n not in a.prune_sizes)
        for name, cmd in commands(folder, w, VAR / f"out-{n}", skip_prune, (a.n, a.l)).items():
            if name == "certify" and a.skip_certify:
                continue
            for _ in range(a.repeat):
                r = {
                    "images": n,
                    "command": name,
                    **measure(cmd, a.code, a.prune_time_limit if name == "prune" else None),
                    "load1": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(r), flush=True)
                rows.append(r)
    if not a.skip_throughput:
        for ref, n, epochs in (("digits", 1437, 40), ("fashion-mnist", a.fashion_subset, 1)):
            r = {
                "dataset": ref,
                "epochs": epochs,
                **throughput(ref, n, a.code, epochs),
                "load1": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(r), flush=True)
    print(
        "\n| images | command | wall s | peak PSS, process tree (MB) | peak RSS, process tree (MB) "
        "| ru_maxrss (MB) | load1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['seconds']} (stopped)" if r["stopped"] else r["seconds"]
        print(
            f"| {r['images']} | {r['command']} | {wall} | {r['peak_tree_pss_mb']} | "
            f"{r['peak_tree_rss_mb']} | {r['maxrss_mb']} | {r['load1']} |"
        )


if __name__ == "__main__":
    main()
