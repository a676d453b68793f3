"""One CAR mask-search step vs one vanilla training step on the same batch.

Target (issue): CAR step <= 4.5x vanilla step. The floor is ~4x: a CAR step runs four forward
passes (noisy mask C_m on x, noisy mask C_n on x, C_m on T(x), hard mask C* on x) and one
backward through all four, a vanilla step one forward and one backward.

vanilla step = train mode, SGD (momentum 0.9): zero_grad, CE forward, backward, step.
CAR step     = core.car.car_step on core.car.fold_batchnorm(model) inside core.car.frozen_eval
               (exactly what search_mask runs, with the CarSpec defaults: labels y for the
               cross-entropy anchor and ratio rows "correct", every row original):
               T(x, 1) under no_grad, Eq. 9 with all four terms, one backward, Adam on m,
               projection onto [0, 1].

--formats nchw,channels_last runs both step kinds in each memory format (a copy of the model and
the inputs converted; the folded search network too), all four interleaved, and reports each
format's speed-up over the first.

Usage: .venv/bin/python bench/bench_car_step.py [--arch resnet18] [--batch 128] [--size 32]
       [--channels 3] [--threads 2] [--warmup 2] [--steps 7] [--device cpu]
       [--formats nchw,channels_last]
Prints one JSON line: medians of wall time (and of process CPU time) per step and their ratios.
"""

from __future__ import annotations

import argparse
import copy
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

from core.car import (  # noqa: E402
    batch_stat_copy,
    car_step,
    fold_batchnorm,
    frozen_eval,
    init_scores,
    mask_optimizer,
    term_lambdas,
)
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


def _steps(model0, args, dev: torch.device, channels_last: bool):
    """(vanilla step, CAR step, CAR context) on a copy of model0, in NCHW or channels_last (model
    weights and inputs; the CAR scores keep their parameters' layout)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model0).to(memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, args.channels, args.size, args.size, generator=g).to(dev)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def vanilla() -> None:
        model.train()
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    spec = CarSpec(search_bn=args.search_bn)  # the product's defaults (anchor, ratio rows "correct")
    lambdas, rows = term_lambdas(spec), torch.arange(args.batch, device=dev)
    scores = {n: s.to(dev).requires_grad_(True) for n, s in init_scores(model, spec).items()}
    adam = mask_optimizer(list(scores.values()), spec.mask_lr)
    with frozen_eval(model):
        # once per search, as in search_mask
        net = batch_stat_copy(model) if args.search_bn == "batch" else fold_batchnorm(model)
        net = net.to(memory_format=fmt)

    def car() -> None:
        with torch.no_grad():
            x_t = brightness(x, torch.ones(len(x), device=dev))
        car_step(net, scores, adam, x, x_t, spec, prune_ratio=args.prune_ratio, scope="layer", y=y,
                 t_rows=rows, lambdas=lambdas)

    return vanilla, car, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--search-bn", choices=("frozen", "batch"), default="frozen", help="CarSpec.search_bn")
    ap.add_argument("--formats", default="nchw", help="memory formats, interleaved: nchw,channels_last")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model0 = build_model(args.arch, args.classes, args.channels, small_input=True).to(dev)
    formats = args.formats.split(",")
    runs = {f: _steps(model0, args, dev, f == "channels_last") for f in formats}

    # interleave every step kind so that load changes on a shared machine hit all alike
    times: dict[str, list[tuple[float, float]]] = {
        f"{k}_{f}": [] for f in formats for k in ("vanilla", "car")
    }
    for vanilla, car, model in runs.values():
        timed(vanilla, args.warmup, dev)
        with frozen_eval(model):
            timed(car, args.warmup, dev)
    for _ in range(args.steps):
        for f, (vanilla, car, model) in runs.items():
            times[f"vanilla_{f}"] += timed(vanilla, 1, dev)
            with frozen_eval(model):
                times[f"car_{f}"] += timed(car, 1, dev)
    med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    med_cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    first = formats[0]
    res = {
        "arch": args.arch,
        "search_bn": args.search_bn,
        "batch": args.batch,
        "input": [args.channels, args.size, args.size],
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": args.threads,
        "steps": args.steps,
        "vanilla_s": round(med[f"vanilla_{first}"], 4),
        "car_s": round(med[f"car_{first}"], 4),
        "ratio": round(med[f"car_{first}"] / med[f"vanilla_{first}"], 3),
        "vanilla_cpu_s": round(med_cpu[f"vanilla_{first}"], 4),
        "car_cpu_s": round(med_cpu[f"car_{first}"], 4),
        "ratio_cpu": round(med_cpu[f"car_{first}"] / med_cpu[f"vanilla_{first}"], 3),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "median_cpu_s": {k: round(v, 4) for k, v in med_cpu.items()},
        "speedup_vs_first_format": {
            k: round(med[f"{k.split('_')[0]}_{first}"] / v, 3) for k, v in med.items()
        },
        "all_s": {k: [round(t, 4) for t, _ in v] for k, v in times.items()},
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "loadavg_1m": load,
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
