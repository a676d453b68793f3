"""core.program against the original nn.Module (the independent computation): a torch.export
program of a network no registry knows computes the same function in eval and train mode, its
BatchNorm statistics are re-estimated and folded as the original's would be, its conv / linear
weights are found from the graph, masks apply through the same masked forward, and the pruned
re-export runs alone. Bad programs raise ProgramError naming the reason."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.car import fold_batchnorm, recalibrating_network
from core.errors import ProgramError, WeightsError
from core.masking import apply_masks_, masked_forward, prunable_weights, topk_mask
from core.program import check_classifier, export_program, load_program_model, read_program
from core.training import recalibrate_batchnorm
from tests.programs import TwoHeadGroupNet, export, torchvision_new_head
from tests.unit.helpers import random_bn_stats


def _conv_linear_weights(net: nn.Module) -> list[str]:
    """Independent: the weight names of the original module's conv / linear layers."""
    return [f"{n}.weight" for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _trained_stats(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (not the init values)."""
    return random_bn_stats(net, spread=0.5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_function_as_the_original_in_both_modes(tmp_path: Path, mode: str) -> None:
    net = _trained_stats(TwoHeadGroupNet(dropout=0.0))
    prog = load_program_model(export(copy.deepcopy(net), tmp_path / "n.pt2", mode))
    x = torch.rand(16, 1, 8, 8)
    net.eval()
    assert torch.allclose(prog.eval()(x), net(x), atol=1e-5)
    # train mode: batch statistics, and the running statistics move exactly as the original's
    net.train()
    prog.train()
    assert torch.allclose(prog(x), net(x), atol=1e-5)
    assert torch.allclose(prog.get_buffer("bn1.running_mean"), net.bn1.running_mean, atol=1e-6)
    assert int(prog.get_buffer("bn2.num_batches_tracked")) == int(net.bn2.num_batches_tracked) == 1
    assert sorted(prog.state_dict()) == sorted(net.state_dict())  # the state-dict names


def test_dropout_follows_the_mode(tmp_path: Path) -> None:
    prog = load_program_model(export(TwoHeadGroupNet(dropout=0.5), tmp_path / "n.pt2", "train"))
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(prog.eval()(x), prog(x))  # exported in train mode, deterministic in eval
    torch.manual_seed(0)
    assert not torch.equal(prog.train()(x), prog(x))


def test_prunable_weights_found_from_the_graph(tmp_path: Path) -> None:
    net = TwoHeadGroupNet()
    prog = load_program_model(export(net, tmp_path / "n.pt2"))
    assert list(prunable_weights(prog)) == _conv_linear_weights(net)  # grouped + depthwise included
    tv = torchvision_new_head()
    tprog = load_program_model(export(tv, tmp_path / "tv.pt2"))
    assert set(prunable_weights(tprog)) == set(_conv_linear_weights(tv))
    assert len(prunable_weights(tprog)) == 54


def test_masks_apply_as_on_the_original(tmp_path: Path) -> None:
    net = _trained_stats(TwoHeadGroupNet()).eval()
    prog = load_program_model(export(net, tmp_path / "n.pt2"))
    weights = prunable_weights(prog)
    masks = topk_mask({k: torch.rand_like(w) for k, w in weights.items()}, 0.6)
    x = torch.rand(10, 1, 8, 8)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for name, m in masks.items():
            ref.get_parameter(name).mul_(m)
    assert torch.allclose(masked_forward(prog, x, masks), ref(x), atol=1e-5)
    apply_masks_(prog, masks)
    assert torch.allclose(prog(x), ref(x), atol=1e-5)


def test_batchnorm_re_estimation_and_folding(tmp_path: Path) -> None:
    net = _trained_stats(TwoHeadGroupNet(dropout=0.0))
    prog = load_program_model(export(copy.deepcopy(net), tmp_path / "n.pt2", "eval"))
    x = torch.rand(300, 1, 8, 8)
    recalibrate_batchnorm(prog, x, seed=3)
    recalibrate_batchnorm(net, x, seed=3)
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_var"):
        assert torch.allclose(prog.get_buffer(name), net.get_buffer(name), atol=1e-5), name
    folded = fold_batchnorm(prog)
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == []  # both BatchNorms folded into the convs before them
    masks = topk_mask({k: torch.rand_like(w) for k, w in prunable_weights(prog).items()}, 0.5)
    assert set(prunable_weights(folded)) == set(masks)
    assert torch.allclose(
        masked_forward(folded, x[:20], masks), masked_forward(prog.eval(), x[:20], masks), atol=1e-4
    )


def test_recalibrating_search_network_of_a_program_matches_the_original(tmp_path: Path) -> None:
    """CAR's search_bn "recalibrate" on a program: the same statistics and function as on the
    original module (fold, hard-masked re-estimation, refresh in place)."""
    net = _trained_stats(TwoHeadGroupNet(dropout=0.0))
    prog = load_program_model(export(copy.deepcopy(net), tmp_path / "n.pt2", "eval"))
    x = torch.rand(300, 1, 8, 8)
    scores = {k: torch.rand_like(w) for k, w in prunable_weights(net).items()}
    hard = topk_mask(scores, 0.6)
    outs = []
    for model in (net, prog):
        search_net, refresh = recalibrating_network(model, x, prune_ratio=0.6, scope="layer", seed=1)
        with torch.no_grad():
            before = masked_forward(search_net, x[:20], hard)
            refresh(scores)
            outs.append(masked_forward(search_net, x[:20], hard))
        assert (outs[-1] - before).abs().max() > 1e-3
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_export_and_weights(tmp_path: Path) -> None:
    net = _trained_stats(TwoHeadGroupNet()).eval()
    path = export(net, tmp_path / "n.pt2")
    other = _trained_stats(TwoHeadGroupNet()).eval()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    prog = load_program_model(path, tmp_path / "w.safetensors")
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(prog(x), other(x), atol=1e-5)
    masks = topk_mask(prunable_weights(prog), 0.5)
    apply_masks_(prog, masks)
    export_program(prog, x, tmp_path / "out.pt2")
    loaded = torch.export.load(str(tmp_path / "out.pt2")).module()
    assert torch.allclose(loaded(x), prog(x), atol=1e-6) and loaded(x[:1]).shape == (1, 10)
    kept = sum(int(m.sum()) for m in masks.values())
    assert sum(int(torch.count_nonzero(loaded.state_dict()[k])) for k in masks) == kept
    save_file({"stem.weight": torch.zeros(8, 1, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="missing keys"):
        load_program_model(path, tmp_path / "bad.safetensors")


def test_check_classifier_names_the_reason(tmp_path: Path) -> None:
    prog = load_program_model(export(TwoHeadGroupNet(), tmp_path / "n.pt2"))
    assert check_classifier(prog, torch.rand(5, 1, 8, 8), 10) == 10
    with pytest.raises(ProgramError, match=r"shape \(3, 8, 8\)"):
        check_classifier(prog, torch.rand(5, 3, 8, 8), 10)
    with pytest.raises(ProgramError, match="returns 10 logits but the dataset has 12 classes"):
        check_classifier(prog, torch.rand(5, 1, 8, 8), 12)
    static = load_program_model(export(TwoHeadGroupNet(), tmp_path / "s.pt2", dynamic_batch=False))
    with pytest.raises(ProgramError, match="dynamic batch dimension"):
        check_classifier(static, torch.rand(5, 1, 8, 8), 10)


def test_read_program_refuses_pickles_and_non_programs(tmp_path: Path) -> None:
    good = export(TwoHeadGroupNet(), tmp_path / "n.pt2")
    bad = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("n/data/weights/model.pt", b"\x80\x04pickle")
    with pytest.raises(ProgramError, match="pickled payload"):
        read_program(bad)
    (tmp_path / "w.pt2").write_bytes(b"\x00" * 64)
    with pytest.raises(ProgramError, match="not a torch.export .pt2 archive"):
        read_program(tmp_path / "w.pt2")
    with pytest.raises(ProgramError, match="not found"):
        read_program(tmp_path / "missing.pt2")


class LooseBatchNorm(nn.Module):
    """Batch norm through F.batch_norm on tensors of the root module: no BatchNorm module to run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.batch_norm(self.conv(x), self.rm, self.rv, training=self.training)
        return self.head(x.mean((2, 3)))


def test_batchnorm_that_cannot_train_is_refused_for_pruning(tmp_path: Path) -> None:
    from core.context import LocalContext
    from core.pipeline import run_job
    from core.spec import JobSpec

    path = export(LooseBatchNorm(), tmp_path / "loose.pt2")
    prog = load_program_model(path)
    assert prog.bn_fixed  # left as exported (eval mode), so certification still works
    spec = JobSpec(model={"program": str(path)}, pruning={"method": "lmp"}, train_subset=50)
    with pytest.raises(ProgramError, match="cannot be switched to train mode"):
        run_job(spec, tmp_path / "out", LocalContext(tmp_path / "work"), device="cpu")


def test_attention_dropout_follows_the_mode_and_random_layers_are_refused(tmp_path: Path) -> None:
    from tests.programs import StochasticDepthNet, TinyViT

    net = TinyViT()
    prog = load_program_model(export(copy.deepcopy(net), tmp_path / "vit.pt2", "train"))
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(prog.eval()(x), net.eval()(x), atol=1e-5)  # dropout_p of the export off
    assert "enc.self_attn.in_proj_weight" in prunable_weights(prog)  # the attention's linear weight
    with pytest.raises(ProgramError, match="random op aten.bernoulli"):
        load_program_model(export(StochasticDepthNet(), tmp_path / "sd.pt2", "train"))
    load_program_model(export(StochasticDepthNet(), tmp_path / "sd-eval.pt2", "eval"))  # fine in eval
