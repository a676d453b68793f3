"""Certification overhead: a whole `certify_model` run vs the bare forward passes it needs.

ResNet-18 (core.models, 10 classes, 3 channels, 32x32, small_input) on CPU with 2 torch threads,
n = 100, l = 10 (n l = 1000 transformed inputs per sample), illumination transform. The bare
baseline runs model(batch) under inference_mode over the same S n l inputs, transformed
beforehand with the same deltas, in batches of the same size. Each measurement is repeated and
the minimum kept (other processes share the CPU). Prints a markdown table row.

    .venv/bin/python bench/bench_certify.py [--samples 3 --batch-size 500 --repeats 2 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.certify import certify_model, sample_deltas, sample_record  # noqa: E402
from core.models import build_model  # noqa: E402
from core.spec import CertifySpec  # noqa: E402
from core.transforms import ParametricTransform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--l", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model("resnet18", 10, 3, small_input=True).eval()
    x = torch.rand(args.samples, 3, 32, 32)
    y = torch.zeros(args.samples, dtype=torch.long)
    transform = ParametricTransform("illumination")
    spec = CertifySpec(n=args.n, l=args.l, samples=args.samples, batch_size=args.batch_size)
    bs, per = args.batch_size, args.n * args.l

    # pre-transformed inputs, exactly those certify_model evaluates
    t0 = time.perf_counter()
    with torch.inference_mode():
        d = torch.cat([sample_deltas(0, i, args.l, args.n).reshape(-1) for i in range(args.samples)])
        s = torch.arange(args.samples).repeat_interleave(per)
        xt = torch.cat([transform(x[s[i:i + bs]], d[i:i + bs], s[i:i + bs]) for i in range(0, len(d), bs)])
    t_transform = time.perf_counter() - t0
    with torch.inference_mode():
        model(xt[:bs])  # warm-up

    bare, cert = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, xt.shape[0], bs):
                model(xt[i:i + bs])
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = certify_model(model, x, y, transform, spec, seed=0)
        cert.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for k in range(args.samples):
        sample_record(k, 0, res.p[k], res.z[k], res.params, res.bound_order)
    t_bound = time.perf_counter() - t0

    tb, tc = min(bare), min(cert)
    ratio = tc / tb
    cpu = platform.processor() or platform.machine()
    print(f"bare forward: {[round(t, 2) for t in bare]} s   certify: {[round(t, 2) for t in cert]} s")
    print(f"non-forward work measured alone: transforms {t_transform:.3f} s, bounds {t_bound:.3f} s "
          f"= {(t_transform + t_bound) / tb:.2%} of the bare forwards")
    print("| machine | samples | n x l | batch | bare forwards (s) | certify (s) | ratio | samples/min |")
    print(f"| {cpu}, {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]}, {args.threads} threads "
          f"| {args.samples} | {args.n}x{args.l} | {bs} | {tb:.2f} | {tc:.2f} | {ratio:.3f} "
          f"| {60 * args.samples / tc:.2f} |")


if __name__ == "__main__":
    main()
