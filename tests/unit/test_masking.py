"""core.masking against independent computations (sorting, torch.nn.utils.prune, in-place multiply)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune

from core.errors import InvalidInput, WeightsError
from core.masking import (
    apply_masks_,
    load_masks,
    masked_forward,
    masks_sha256,
    partial_scaled_init,
    prunable_weights,
    random_init,
    save_masks,
    sparsity_report,
    straight_through_mask,
    topk_mask,
)


def tiny_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 8 * 8, 17),
        nn.ReLU(),
        nn.Linear(17, 10),
    )


def test_prunable_weights_are_conv_and_linear_weights_only():
    net = tiny_net()
    w = prunable_weights(net)
    assert list(w) == ["0.weight", "3.weight", "6.weight", "8.weight"]
    sd = net.state_dict()
    for name, p in w.items():
        assert p is dict(net.named_parameters())[name]
        assert torch.equal(p, sd[name])


@pytest.mark.parametrize("tau", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_partial_scaled_init_top_tau_fraction_at_one(tau):
    net = tiny_net()
    weights = prunable_weights(net)
    masks = partial_scaled_init(weights, tau)
    for name, w in weights.items():
        a = w.detach().abs().flatten()
        n = a.numel()
        order = torch.argsort(a, descending=True)
        k = max(1, round(tau * n))  # tau=0: only the max is at 1 (HYDRA full-scaled, m=|w|/max|w|)
        m = masks[name].flatten()
        assert m.shape == a.shape and m.min() >= 0 and m.max() <= 1
        ones = (m == 1.0).nonzero().flatten()
        assert ones.numel() == k, (name, ones.numel(), k)
        assert set(ones.tolist()) == set(order[:k].tolist())
        q = a[order[k - 1]]
        rest = order[k:]
        torch.testing.assert_close(m[rest], a[rest] / q)
        assert bool((m[rest] < 1).all())


def test_random_init_uniform_and_seeded():
    weights = prunable_weights(tiny_net())
    a, b = random_init(weights, seed=3), random_init(weights, seed=3)
    for name, w in weights.items():
        assert a[name].shape == w.shape
        assert torch.equal(a[name], b[name])
        assert a[name].min() >= 0 and a[name].max() <= 1
    allv = torch.cat([v.flatten() for v in a.values()])
    assert abs(allv.mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("pr", [0.1, 0.5, 0.73, 0.9])
def test_topk_mask_exact_counts_layer(pr):
    weights = prunable_weights(tiny_net())
    masks = topk_mask(weights, pr, "layer")
    for name, w in weights.items():
        m = masks[name]
        assert m.dtype == torch.bool and m.shape == w.shape
        k = round((1 - pr) * w.numel())
        assert int(m.sum()) == k
        # kept entries are exactly the k largest |w| (brute force by sorting)
        order = torch.argsort(w.detach().abs().flatten(), descending=True)
        assert set(m.flatten().nonzero().flatten().tolist()) == set(order[:k].tolist())


@pytest.mark.parametrize("pr", [0.2, 0.5, 0.85])
def test_topk_mask_exact_counts_global(pr):
    weights = prunable_weights(tiny_net())
    masks = topk_mask(weights, pr, "global")
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - pr) * total)
    w_abs = {n: w.detach().abs() for n, w in weights.items()}
    thr_kept = min(float(a[masks[n]].min()) for n, a in w_abs.items() if masks[n].any())
    thr_pruned = max(float(a[~masks[n]].max()) for n, a in w_abs.items() if (~masks[n]).any())
    assert thr_kept >= thr_pruned


@pytest.mark.parametrize("pr", [0.3, 0.5, 0.8])
def test_topk_mask_matches_torch_prune(pr):
    net = tiny_net()
    weights = prunable_weights(net)
    # per layer: l1_unstructured with the same number of pruned entries
    ours = topk_mask(weights, pr, "layer")
    ref_net = copy.deepcopy(net)
    mods = dict(ref_net.named_modules())
    for name, w in weights.items():
        mod = mods[name.rsplit(".", 1)[0]]
        prune.l1_unstructured(mod, "weight", amount=w.numel() - round((1 - pr) * w.numel()))
        assert torch.equal(mod.weight_mask.bool(), ours[name])
    # global: global_unstructured (L1) over all prunable weights
    ours_g = topk_mask(weights, pr, "global")
    ref_net = copy.deepcopy(net)
    mods = dict(ref_net.named_modules())
    params = [(mods[n.rsplit(".", 1)[0]], "weight") for n in weights]
    total = sum(w.numel() for w in weights.values())
    prune.global_unstructured(params, prune.L1Unstructured, amount=total - round((1 - pr) * total))
    for (mod, _), name in zip(params, weights, strict=True):
        assert torch.equal(mod.weight_mask.bool(), ours_g[name])


def test_topk_mask_rejects_bad_arguments():
    weights = prunable_weights(tiny_net())
    with pytest.raises(InvalidInput):
        topk_mask(weights, 1.0)
    with pytest.raises(InvalidInput):
        topk_mask(weights, 0.5, "channel")


def test_straight_through_forward_is_hard_and_gradient_reaches_scores():
    torch.manual_seed(0)
    net = tiny_net()
    scores = {n: torch.rand(w.shape, requires_grad=True) for n, w in prunable_weights(net).items()}
    st = straight_through_mask(scores, 0.6, "layer")
    hard = topk_mask(scores, 0.6, "layer")
    for n in scores:
        assert torch.equal(st[n], hard[n].float())  # exactly 0/1 in the forward
    x = torch.rand(4, 1, 8, 8)
    masked_forward(net, x, st).square().sum().backward()
    # the same loss with the hard mask as a leaf: its gradient must equal the scores' gradient
    hard_leaf = {n: hard[n].float().requires_grad_(True) for n in scores}
    masked_forward(net, x, hard_leaf).square().sum().backward()
    for n in scores:
        assert scores[n].grad is not None
        torch.testing.assert_close(scores[n].grad, hard_leaf[n].grad)
        assert scores[n].grad.abs().sum() > 0
        # pruned entries still get gradient (identity backward), unlike a plain multiply by 0/1
        assert scores[n].grad[~hard[n]].abs().sum() > 0


def test_masked_forward_equals_in_place_multiplied_model():
    net = tiny_net().eval()
    weights = prunable_weights(net)
    torch.manual_seed(5)
    soft = {n: torch.rand(w.shape) for n, w in weights.items()}
    x = torch.rand(7, 1, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = masked_forward(net, x, soft)
    for k, v in net.state_dict().items():  # the model is untouched
        assert torch.equal(v, before[k])
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in prunable_weights(ref).items():
            p.copy_(p * soft[n])
    torch.testing.assert_close(out, ref(x))
    # apply_masks_ with a hard mask == masked_forward with the same mask
    hard = topk_mask(weights, 0.5)
    out_h = masked_forward(net, x, hard)
    apply_masks_(net, hard)
    torch.testing.assert_close(out_h, net(x))
    for n, p in prunable_weights(net).items():
        assert bool((p[~hard[n]] == 0).all())
        assert torch.equal(p[hard[n]], before[n][hard[n]])


def test_masked_forward_unknown_layer():
    with pytest.raises(InvalidInput):
        masked_forward(tiny_net(), torch.rand(1, 1, 8, 8), {"nope.weight": torch.ones(1)})


def test_save_load_masks_roundtrip_and_metadata(tmp_path):
    net = tiny_net()
    masks = topk_mask(prunable_weights(net), 0.7)
    path = tmp_path / "mask.safetensors"
    digest = save_masks(path, masks, {"method": "car"})
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_masks(path)
    assert set(back) == set(masks)
    for n in masks:
        assert back[n].dtype == torch.bool and torch.equal(back[n], masks[n])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "car"
    layer = json.loads(meta["layer_sparsity"])
    for n, m in masks.items():
        assert layer[n] == pytest.approx(1 - m.float().mean().item())
    assert meta["content_sha256"] == masks_sha256(masks)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert float(meta["sparsity"]) == pytest.approx(1 - kept / total)


def test_load_masks_rejects_corrupt_and_tampered(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError):
        load_masks(bad)
    with pytest.raises(WeightsError):
        load_masks(tmp_path / "missing.safetensors")
    nonbin = tmp_path / "nonbin.safetensors"
    save_file({"a.weight": torch.tensor([0.0, 0.5, 1.0])}, str(nonbin))
    with pytest.raises(WeightsError):
        load_masks(nonbin)
    ok = tmp_path / "float01.safetensors"
    save_file({"a.weight": torch.tensor([0.0, 1.0, 1.0])}, str(ok))
    assert torch.equal(load_masks(ok)["a.weight"], torch.tensor([False, True, True]))
    # a file whose tensors were changed after the hash was recorded
    masks = {"a.weight": torch.tensor([True, False, True])}
    p = tmp_path / "m.safetensors"
    save_masks(p, masks)
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    save_file({"a.weight": torch.tensor([True, True, True])}, str(p), metadata=meta)
    with pytest.raises(WeightsError):
        load_masks(p)


def test_sparsity_report_counts():
    net = tiny_net()
    weights = prunable_weights(net)
    masks = topk_mask(weights, 0.4)
    rep = sparsity_report(net, masks)
    total = sum(w.numel() for w in weights.values())
    kept = sum(int(((w != 0) & masks[n]).sum()) for n, w in weights.items())
    assert rep["params"] == total and rep["nonzero"] == kept
    assert rep["sparsity"] == pytest.approx(1 - kept / total)
    assert [layer["name"] for layer in rep["layers"]] == list(weights)
    apply_masks_(net, masks)
    rep2 = sparsity_report(net)
    assert rep2["nonzero"] == kept
    for layer in rep2["layers"]:
        n = weights[layer["name"]].numel()
        assert layer["sparsity"] == pytest.approx(1 - round(0.6 * n) / n)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_topk_mask_tiebreak_falls_back_to_magnitude(scope):
    weights = prunable_weights(tiny_net())
    # all scores tied at 0 -> with the weights as tie-break the mask is the magnitude mask
    zeros = {n: torch.zeros_like(w) for n, w in weights.items()}
    tied = topk_mask(zeros, 0.6, scope, tiebreak=weights)
    mag = topk_mask(weights, 0.6, scope)
    for n in weights:
        assert torch.equal(tied[n], mag[n])
    # partial ties: scores 1 on a random half, 0 elsewhere; keep-count > #ones -> all ones kept,
    # the rest filled from the zeros by largest |w|
    g = torch.Generator().manual_seed(0)
    half = {n: (torch.rand(w.shape, generator=g) < 0.3).float() for n, w in weights.items()}
    got = topk_mask(half, 0.5, "layer", tiebreak=weights)
    for n, w in weights.items():
        k = round(0.5 * w.numel())
        ones = half[n].bool()
        assert int(got[n].sum()) == k
        assert bool(got[n][ones].all())
        rest = w.detach().abs()[~ones]
        need = k - int(ones.sum())
        chosen = w.detach().abs()[got[n] & ~ones]
        assert chosen.numel() == need
        torch.testing.assert_close(
            chosen.sort().values, rest.sort(descending=True).values[:need].sort().values
        )
