"""What unstructured pruning buys a deployed model: file size and CPU latency.

For each architecture and prune ratio: the core.models network for Fashion-MNIST inputs (1 x 28 x
28, 10 classes, small_input), random weights, pruned layer-wise by magnitude (core.masking.topk_mask
on the weights, the LMP mask; the zero pattern of a trained LMP or CAR mask is equally unstructured).
Sizes of the same pruned weights stored as: dense float32 safetensors (what carcert writes), that file
deflated (zip), a bitmap format (a packed 1-bit mask + the float32 non-zeros of each prunable
weight, other tensors dense; written as safetensors), the same deflated, CSR with int32 indices
(prunable weights as (out, in * k * k) matrices), and the ONNX file (core.deploy). Latency:
median wall time of one forward pass (batch 1 and 64) in torch eager mode, unpruned and pruned,
and in ONNX Runtime, one thread each (torch.set_num_threads(1), intra_op_num_threads=1). Prints
markdown tables.

    .venv/bin/python bench/bench_deploy.py [--archs small_cnn,resnet18 --ratios 0.5,0.7 --repeats 20]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save  # noqa: E402

from core.deploy import export_deployable  # noqa: E402
from core.masking import apply_masks_, prunable_weights, topk_mask  # noqa: E402
from core.models import build_model, save_weights  # noqa: E402

SHAPE = (1, 28, 28)
META = {"in_channels": "1", "num_classes": "10", "small_input": "True"}


def deflated(data: bytes) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("model.safetensors", data)
    return len(buf.getvalue())


def bitmap_bytes(model: torch.nn.Module) -> bytes:
    """Prunable weights as packed bit masks + float32 non-zeros; every other tensor dense."""
    prunable = set(prunable_weights(model))
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        if name in prunable:
            keep = t != 0
            out[f"{name}.bits"] = torch.from_numpy(np.packbits(keep.flatten().numpy()))
            out[f"{name}.values"] = t[keep].clone()
        else:
            out[name] = t.clone()
    return save(out)


def csr_size(model: torch.nn.Module) -> int:
    """Bytes of CSR storage (float32 values, int32 column indices and row pointers) of the prunable
    weights plus every other tensor dense."""
    prunable = set(prunable_weights(model))
    total = 0
    for name, t in model.state_dict().items():
        if name in prunable:
            nnz = int(torch.count_nonzero(t))
            total += nnz * 4 + nnz * 4 + (t.shape[0] + 1) * 4
        else:
            total += t.numel() * t.element_size()
    return total


def median_ms(fn, x, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def run(arch: str, ratio: float, repeats: int, tmp: Path) -> tuple[list, list]:
    """(sizes in MB, latencies in ms; none when repeats is 0) of one architecture and ratio."""
    torch.manual_seed(0)
    net = build_model(arch, 10, 1, small_input=True).eval()
    dense = build_model(arch, 10, 1, small_input=True).eval()
    dense.load_state_dict(net.state_dict())
    apply_masks_(net, topk_mask(prunable_weights(net), ratio))
    path = tmp / f"{arch}-{ratio}.safetensors"
    save_weights(net, path, metadata={"arch": arch, **META})
    data, bits = path.read_bytes(), bitmap_bytes(net)
    metrics = {"arch": arch, "num_classes": 10, "dataset": {"ref": "fashion-mnist", "shape": list(SHAPE)}}
    onnx_path = tmp / f"{arch}-{ratio}.onnx"
    export_deployable("onnx", onnx_path, weights=path, metrics=metrics, certificate=None)
    mb = 1 / 1e6
    sizes = [len(data) * mb, deflated(data) * mb, len(bits) * mb, deflated(bits) * mb]
    sizes += [csr_size(net) * mb, onnx_path.stat().st_size * mb]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    lat: list[float] = []
    for batch in (1, 64) if repeats else ():
        x = torch.rand(batch, *SHAPE)
        with torch.inference_mode():
            lat.append(median_ms(dense, x, repeats))
            lat.append(median_ms(net, x, repeats))
        lat.append(median_ms(lambda a: session.run(None, {"input": a}), x.numpy(), repeats))
    return sizes, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="small_cnn,resnet18")
    ap.add_argument("--ratios", default="0.5,0.7")
    ap.add_argument("--repeats", type=int, default=20, help="0: sizes only (untimed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    size_rows, lat_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                sizes, lat = run(arch, ratio, args.repeats, Path(tmp))
                size_rows.append(f"| {arch} | {ratio} | " + " | ".join(f"{s:.3f}" for s in sizes) + " |")
                lat_rows.append(f"| {arch} | {ratio} | " + " | ".join(f"{v:.2f}" for v in lat) + " |")
    print(
        "| arch | prune ratio | dense safetensors MB | dense, zip MB | bitmap + values MB "
        "| bitmap, zip MB | CSR int32 MB | ONNX MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(size_rows))
    if args.repeats == 0:
        return
    print()
    print(
        "| arch | prune ratio | b1 eager unpruned ms | b1 eager pruned ms | b1 ORT pruned ms "
        "| b64 eager unpruned ms | b64 eager pruned ms | b64 ORT pruned ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lat_rows))


if __name__ == "__main__":
    main()
