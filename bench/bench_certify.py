"""Certification speed per forward form (core.fastforward) against the eager fp32 NCHW baseline.

ResNet-18 (core.models, 10 classes, 3 channels, 32x32, small_input, random weights, eval mode),
illumination transform at --strength 2 (random weights are robust at 1: every sample certified),
labels = the clean predictions (so decisions hinge on the bound), n x l
transformed inputs per sample, forward batch --batch-size, `--threads` torch threads.

1. img/s of one forward batch per form (best of --repeats batches after a warm-up): eager fp32
   NCHW (the model as given: what certify ran before core.fastforward), channels_last, compiled
   (torch.compile of the channels_last copy; its compile time is reported), bf16 (bf16 autocast,
   channels_last; on a CPU without native bf16 only --bf16-images inputs, it is emulated and slow).
2. certify_model per form (CARCERT_FORWARD forces the form) on --samples samples: seconds,
   certified samples/min (the compile time, paid once per model and shape, reported apart and
   also folded in), and against the eager run: decisions that differ, max |epsilon_bound|,
   |p| and |Z| differences. bf16 certifies --bf16-samples samples (the first ones of the eager run).
   Forms other than eager take the calibrated batch on such a run (core.calibrate, --calibration;
   the calibration's timing is inside "certify s"; a fresh cache file per run unless
   CARCERT_CALIBRATION_CACHE is set); the batch that ran is printed beside the form.
3. --demo: the `make demo` certification (small_cnn trained 3 epochs on digits, illumination,
   n = 100, l = 10, 50 samples) in every fp32 form: decisions and bound differences against eager.

    .venv/bin/python bench/bench_certify.py [--samples 100 --forms eager,channels_last,compiled,bf16
        --bf16-samples 2 --device cpu --threads 2 --demo]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.calibrate import CALIBRATE_ENV, CALIBRATION_CACHE_ENV  # noqa: E402
from core.certify import certify_model  # noqa: E402
from core.fastforward import FORM_ENV, prepare_forward  # noqa: E402
from core.models import build_model  # noqa: E402
from core.spec import CertifySpec  # noqa: E402
from core.transforms import ParametricTransform  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _with_form(form: str):
    """Context: CARCERT_FORWARD=form for the duration (auto restores the default)."""

    class _Env:
        def __enter__(self):
            self.old = os.environ.get(FORM_ENV)
            os.environ[FORM_ENV] = form

        def __exit__(self, *exc):
            if self.old is None:
                os.environ.pop(FORM_ENV, None)
            else:
                os.environ[FORM_ENV] = self.old

    return _Env()


def _forward_of(model, form: str, bs: int, dev: torch.device):
    """(callable, compile seconds) of `form`: 'bf16' is bf16 autocast in channels_last."""
    t0 = time.perf_counter()
    precision = "bf16" if form == "bf16" else "fp32"
    with _with_form("channels_last" if form == "bf16" else form):
        fwd = prepare_forward(model, (3, 32, 32), bs, device=dev, precision=precision)
    _sync(dev)
    return fwd, (time.perf_counter() - t0 if fwd.form == "compiled" else 0.0), fwd.describe()


def throughput(model, forms: list[str], args, dev: torch.device) -> dict[str, dict]:
    """img/s per form on one batch (best of args.repeats), compile seconds, what ran."""
    out = {}
    native_bf16 = dev.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for form in forms:
        fwd, compile_s, desc = _forward_of(model, form, args.batch_size, dev)
        n = args.batch_size if form != "bf16" or native_bf16 else args.bf16_images
        x = torch.rand(n, 3, 32, 32, device=dev)
        fwd(x)
        best = float("inf")
        for _ in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fwd(x)
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        out[form] = {"img_s": n / best, "compile_s": compile_s, "desc": desc, "images": n}
        print(
            f"  {form:14s} {n / best:8.1f} img/s  (batch {n}, compile {compile_s:.1f} s, ran {desc})",
            flush=True,
        )
    return out


def _compare(res, ref) -> dict:
    """Decisions and numbers of `res` against the eager `ref` on res's samples."""
    k = len(res.samples)
    a, b = res.samples, ref.samples[:k]
    return {
        "differ": sum(x["certified"] != y["certified"] for x, y in zip(a, b, strict=True)),
        "eps": max(abs(x["epsilon_bound"] - y["epsilon_bound"]) for x, y in zip(a, b, strict=True)),
        "p": float(np.abs(res.p - ref.p[:k]).max()),
        "z": float(np.nanmax(np.abs(res.z - ref.z[:k]))),
        "certified": sum(x["certified"] for x in a),
    }


def certification(model, forms: list[str], args, dev: torch.device, ips: dict) -> None:
    """certify_model per form; one markdown row each."""
    torch.manual_seed(1)
    x = torch.rand(args.samples, 3, 32, 32)
    with torch.inference_mode():
        y = model(x.to(dev)).argmax(1).cpu()
    transform = ParametricTransform("illumination", args.strength)
    print(
        "| form | samples | certify s | compile s | samples/min | x eager | (compile folded in) "
        "| certified | decisions != eager | max abs eps diff | max abs p diff | max abs Z diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref, base = None, None
    for form in forms:
        s = args.bf16_samples if form == "bf16" else args.samples
        spec = CertifySpec(
            n=args.n,
            l=args.l,
            samples=s,
            batch_size=args.batch_size,
            precision="bf16" if form == "bf16" else "fp32",
        )
        with _with_form("auto" if form == "bf16" else form):
            t0 = time.perf_counter()
            res = certify_model(model, x, y, transform, spec, seed=0, device=str(dev))
            secs = time.perf_counter() - t0
        ref = ref if ref is not None else res
        rate = 60 * s / secs
        base = base or rate
        comp = ips.get(form, {}).get("compile_s", 0.0) if res.forward["form"] == "compiled" else 0.0
        c, ran = _compare(res, ref), res.forward
        print(
            f"| {form} ({ran['form']}, {ran['precision']}, batch {ran['batch']}) | {s} | {secs:.1f} "
            f"| {comp:.1f} "
            f"| {rate:.2f} | {rate / base:.2f} | {60 * s / (secs + comp) / base:.2f} | {c['certified']} "
            f"| {c['differ']} | {c['eps']:.2e} | {c['p']:.2e} | {c['z']:.2e} |",
            flush=True,
        )


def demo(args) -> None:
    """The make-demo certification in each fp32 form: decisions and bounds against eager."""
    from core.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    model = build_model("small_cnn", data.num_classes, data.in_channels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for b in torch.randperm(data.train_x.shape[0]).split(64):
            loss = torch.nn.functional.cross_entropy(model(data.train_x[b]), data.train_y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    spec = CertifySpec(n=100, l=10, samples=50)
    transform = ParametricTransform("illumination")
    ref = None
    for form in ("eager", "channels_last", "compiled", "auto"):
        with _with_form(form):
            t0 = time.perf_counter()
            res = certify_model(model, data.test_x, data.test_y, transform, spec, seed=0)
            secs = time.perf_counter() - t0
        ref = ref or res
        c = _compare(res, ref)
        print(
            f"| demo {form} ({res.forward['form']}) | {secs:.1f} | {res.pca:.2f} | {c['differ']} "
            f"| {c['eps']:.2e} | {c['p']:.2e} | {c['z']:.2e} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--bf16-samples", type=int, default=2)
    ap.add_argument("--bf16-images", type=int, default=50, help="img/s batch of bf16 where it is emulated")
    ap.add_argument(
        "--strength", type=float, default=2.0, help="illumination strength (2: a mix of decisions)"
    )
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--l", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--forms", default="eager,channels_last,compiled,bf16")
    ap.add_argument("--demo", action="store_true", help="also the make-demo decisions per form")
    ap.add_argument("--skip-certify", action="store_true")
    ap.add_argument("--certify-forms", default="", help="forms of part 2 (default: --forms; eager first)")
    ap.add_argument("--batch-sweep", default="", help="img/s of channels_last at these batch sizes (a,b,...)")
    ap.add_argument("--calibration", default="auto", choices=("auto", "on", "off"),
                    help="CARCERT_BATCH_CALIBRATION for part 2 (core.calibrate; fresh cache file per run)")
    args = ap.parse_args()
    os.environ[CALIBRATE_ENV] = args.calibration
    os.environ.setdefault(CALIBRATION_CACHE_ENV, f"/tmp/carcert-bench-calibration-{os.getpid()}.json")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    forms = args.forms.split(",")
    assert forms[0] == "eager", "the first form is the baseline: eager"
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    print(f"machine: {name}, torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, small_input=True).eval().to(dev)
    print("img/s per form (resnet18 32x32):")
    ips = throughput(model, forms, args, dev)
    base = ips["eager"]["img_s"]
    print("| form | img/s | x eager fp32 NCHW | compile s |")
    print("|---|---|---|---|")
    for form, r in ips.items():
        print(f"| {form} | {r['img_s']:.1f} | {r['img_s'] / base:.2f} | {r['compile_s']:.1f} |")
    for bs in [int(b) for b in args.batch_sweep.split(",") if b]:
        fwd, _, _ = _forward_of(model, "channels_last", bs, dev)
        x = torch.rand(bs, 3, 32, 32, device=dev)
        fwd(x)
        _sync(dev)
        t0 = time.perf_counter()
        fwd(x)
        _sync(dev)
        print(f"| channels_last, batch {bs} | {bs / (time.perf_counter() - t0):.1f} | | |", flush=True)
    if not args.skip_certify:
        print(f"certification, n={args.n} l={args.l}, batch {args.batch_size}, load {os.getloadavg()}:")
        certification(model, args.certify_forms.split(",") if args.certify_forms else forms, args, dev, ips)
    if args.demo:
        print(
            "| demo form | certify s | PCA | decisions != eager | max abs eps diff | max abs p diff "
            "| max abs Z diff |"
        )
        print("|---|---|---|---|---|---|---|")
        demo(args)
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
