"""One CAR mask-search step vs one vanilla training step on the same batch.

Target (issue): CAR step <= 4.5x vanilla step. The floor is ~4x: a CAR step runs four forward
passes (noisy mask C_m on x, noisy mask C_n on x, C_m on T(x), hard mask C* on x) and one
backward through all four, a vanilla step one forward and one backward.

vanilla step = train mode, SGD (momentum 0.9): zero_grad, CE forward, backward, step.
CAR step     = core.car.car_step on core.car.fold_batchnorm(model) inside core.car.frozen_eval
               (exactly what search_mask runs):
               T(x, 1) under no_grad, Eq. 9 with all four terms, one backward, Adam on m,
               projection onto [0, 1].

Usage: .venv/bin/python bench/bench_car_step.py [--arch resnet18] [--batch 128] [--size 32]
       [--threads 2] [--warmup 2] [--steps 7] [--device cpu]
Prints one JSON line: medians of wall time (and of process CPU time) per step and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.car import batch_stat_copy, car_step, fold_batchnorm, frozen_eval, init_scores, mask_optimizer  # noqa: E402
from core.models import build_model  # noqa: E402
from core.spec import CarSpec  # noqa: E402


def brightness(x: torch.Tensor, delta: torch.Tensor, index=None) -> torch.Tensor:
    return x * (1 - 0.5 * delta.view(-1, 1, 1, 1))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, dev: torch.device) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of n calls. On a shared machine the CPU time (all
    threads of this process) is the steadier of the two."""
    out = []
    for _ in range(n):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(dev)
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--search-bn", choices=("frozen", "batch"), default="frozen", help="CarSpec.search_bn")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build_model(args.arch, args.classes, 3, small_input=True).to(dev)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)

    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def vanilla() -> None:
        model.train()
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    spec = CarSpec(search_bn=args.search_bn)
    scores = {n: s.to(dev).requires_grad_(True) for n, s in init_scores(model, spec).items()}
    adam = mask_optimizer(list(scores.values()), spec.mask_lr)
    with frozen_eval(model):
        # once per search, as in search_mask
        net = batch_stat_copy(model) if args.search_bn == "batch" else fold_batchnorm(model)

    def car() -> None:
        with torch.no_grad():
            x_t = brightness(x, torch.ones(len(x), device=dev))
        car_step(net, scores, adam, x, x_t, spec, prune_ratio=args.prune_ratio, scope="layer")

    # interleave the two so that load changes on a shared machine hit both alike
    v_times, c_times = [], []
    timed(vanilla, args.warmup, dev)
    with frozen_eval(model):
        timed(car, args.warmup, dev)
    for _ in range(args.steps):
        v_times += timed(vanilla, 1, dev)
        with frozen_eval(model):
            c_times += timed(car, 1, dev)
    v, c = statistics.median(t for t, _ in v_times), statistics.median(t for t, _ in c_times)
    vc, cc = statistics.median(t for _, t in v_times), statistics.median(t for _, t in c_times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = {
        "arch": args.arch,
        "search_bn": args.search_bn,
        "batch": args.batch,
        "size": args.size,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": args.threads,
        "steps": args.steps,
        "vanilla_s": round(v, 4),
        "car_s": round(c, 4),
        "ratio": round(c / v, 3),
        "vanilla_cpu_s": round(vc, 4),
        "car_cpu_s": round(cc, 4),
        "ratio_cpu": round(cc / vc, 3),
        "vanilla_all_s": [round(t, 4) for t, _ in v_times],
        "car_all_s": [round(t, 4) for t, _ in c_times],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "loadavg_1m": load,
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
