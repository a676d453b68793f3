"""CAR losses (Eq. 5-9) against plain formulas / brute force, pass sharing, ablation switches, and
an end-to-end run on real digits."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from core.car import (
    RATIO_EPS,
    balanced_lambdas,
    batch_stat_copy,
    car_loss,
    car_step,
    car_terms,
    consistency_loss,
    init_scores,
    l1_loss,
    mask_optimizer,
    noisy_masks,
    ratio_loss,
    run_car,
    search_mask,
    stability_loss,
    term_grad_norms,
)
from core.context import LocalContext
from core.data import load_dataset
from core.errors import Cancelled, InvalidInput, TrainingDiverged
from core.masking import apply_masks_, masked_forward, partial_scaled_init, prunable_weights, topk_mask
from core.models import build_model
from core.spec import CarSpec, PruningSpec
from core.training import evaluate, train_epochs
from tests.unit.helpers import brightness, one_thread, random_bn_stats  # noqa: F401 (one_thread: autouse fixture)

TERMS = ("stab", "ratio", "consis", "l1")


def tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    )


def softmax_np(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_stability_loss_pair_and_variance_identity_by_enumeration():
    """Eq. 5 / Appendix A.3: over a distribution Q uniform on a finite set of masks,
    E_{Cm,Cn iid} ||p_Cm - p_Cn||^2 (all ordered pairs) == 2 E_C ||p_C - p_bar||^2."""
    net = tiny_net().eval()
    x = torch.rand(6, 1, 8, 8)
    weights = prunable_weights(net)
    g = torch.Generator().manual_seed(0)
    mask_set = [{n: torch.rand(w.shape, generator=g) for n, w in weights.items()} for _ in range(5)]
    with torch.no_grad():
        probs = [torch.softmax(masked_forward(net, x, m), -1) for m in mask_set]
    P = np.stack([p.double().numpy() for p in probs])  # (M, B, K)
    # one pair, by the plain formula
    want = np.mean(np.sum((P[0] - P[1]) ** 2, axis=1))
    assert float(stability_loss(probs[0], probs[1])) == pytest.approx(want, rel=1e-5)
    # expectation over independent pairs by enumeration
    pairs = [float(stability_loss(probs[i], probs[j])) for i, j in itertools.product(range(5), repeat=2)]
    p_bar = P.mean(axis=0)
    identity = 2 * np.mean(np.sum((P - p_bar) ** 2, axis=2))
    assert np.mean(pairs) == pytest.approx(identity, rel=1e-5)
    assert identity > 0


def test_ratio_loss_hand_computed():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    p_t = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3], [0.89, 0.06, 0.05]])
    eta = 0.5

    def one(pp, pt):
        z = max(abs(a - b) for a, b in zip(pp, pt, strict=True))
        s = sorted(pp, reverse=True)
        d = (s[0] - s[1]) / 2
        r = z / (d + RATIO_EPS)
        return math.log1p(math.exp(max(r - eta, 0.0)))

    want = sum(one(a, b) for a, b in zip(p.tolist(), p_t.tolist(), strict=True)) / 3
    assert float(ratio_loss(p, p_t, eta)) == pytest.approx(want, rel=1e-5)
    # third sample: r = 0.01 / 0.4255 < eta -> softplus(0) = log 2 exactly
    assert float(ratio_loss(p[2:], p_t[2:], eta)) == pytest.approx(math.log(2), rel=1e-6)


def test_consistency_loss_is_kl_soft_to_hard():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ps, ph = softmax_np(a.double().numpy()), softmax_np(b.double().numpy())
    want = np.mean(np.sum(ps * np.log(ps / ph), axis=1))
    assert float(consistency_loss(a, b)) == pytest.approx(want, rel=1e-5)
    assert float(consistency_loss(a, a)) == pytest.approx(0.0, abs=1e-7)


def test_l1_loss_mean_abs_over_all_entries():
    s = {"a": torch.tensor([[0.2, 0.4], [1.0, 0.0]]), "b": torch.tensor([0.5, 0.3, 0.6])}
    assert float(l1_loss(s)) == pytest.approx((0.2 + 0.4 + 1.0 + 0.5 + 0.3 + 0.6) / 7)


def test_noisy_masks_range_and_gradient():
    torch.manual_seed(0)
    m = torch.rand(20000).requires_grad_(True)
    out = noisy_masks({"w": m}, 0.5)["w"]
    assert out.min() >= 0 and out.max() <= 1
    noise = out.detach() - m.detach()
    inner = (out > 0) & (out < 1)
    assert noise[inner].abs().max() <= 0.5 + 1e-6
    assert abs(noise[inner].mean().item()) < 0.02  # U(-0.5, 0.5) has mean 0 (inside the clip)
    assert noise[inner].abs().max() > 0.45
    out.sum().backward()
    assert torch.equal(m.grad, inner.float())  # d clip(m + u) / dm = 1 inside, 0 where clipped


def count_forwards(net: nn.Module) -> list[int]:
    calls = [0]
    net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "on,expected",
    [
        (TERMS, 4),
        (("stab", "ratio", "l1"), 3),
        (("ratio", "consis"), 3),
        (("stab",), 2),
        (("ratio",), 2),
        (("consis",), 2),
        (("l1",), 0),
    ],
)
def test_car_loss_shares_passes_and_skips_switched_off_terms(on, expected):
    net = tiny_net().eval()
    calls = count_forwards(net)
    scores = {n: s.requires_grad_(True) for n, s in partial_scaled_init(prunable_weights(net), 0.3).items()}
    # eta = 0 keeps the hinge of L_ratio active, so every term has a non-zero gradient
    spec = CarSpec.published(eta=0.0, **{f"lambda_{t}": (1.0 if t in on else 0.0) for t in TERMS})
    x = torch.rand(8, 1, 8, 8)
    loss, parts = car_loss(net, scores, x, brightness(x, torch.ones(8)), spec, prune_ratio=0.5)
    assert calls[0] == expected
    assert set(parts) == set(on)
    assert float(loss.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores.values())


def test_car_loss_total_is_weighted_sum_of_the_terms():
    net = tiny_net().eval()
    scores = partial_scaled_init(prunable_weights(net), 0.3)
    x = torch.rand(8, 1, 8, 8)
    xt = brightness(x, torch.ones(8))
    spec = CarSpec.published(lambda_stab=0.5, lambda_ratio=2.0, lambda_consis=3.0, lambda_l1=0.25)
    torch.manual_seed(7)
    loss, parts = car_loss(net, scores, x, xt, spec, prune_ratio=0.5)
    loss = loss.detach()
    want = 0.5 * parts["stab"] + 2.0 * parts["ratio"] + 3.0 * parts["consis"] + 0.25 * parts["l1"]
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # recompute every term independently with the same noise draws
    torch.manual_seed(7)
    m1 = noisy_masks(scores, 0.5)
    m2 = noisy_masks(scores, 0.5)
    with torch.no_grad():
        p1 = torch.softmax(masked_forward(net, x, m1), -1).double().numpy()
        p2 = torch.softmax(masked_forward(net, x, m2), -1).double().numpy()
        pt = torch.softmax(masked_forward(net, xt, m1), -1).double().numpy()
        ph = torch.softmax(masked_forward(net, x, topk_mask(scores, 0.5)), -1).double().numpy()
    assert parts["stab"] == pytest.approx(np.mean(np.sum((p1 - p2) ** 2, 1)), rel=1e-4)
    s = np.sort(p1, 1)
    r = np.abs(p1 - pt).max(1) / ((s[:, -1] - s[:, -2]) / 2 + RATIO_EPS)
    assert parts["ratio"] == pytest.approx(np.mean(np.log1p(np.exp(np.maximum(r - 1.0, 0)))), rel=1e-4)
    assert parts["consis"] == pytest.approx(np.mean(np.sum(p1 * np.log(p1 / ph), 1)), rel=1e-4, abs=1e-7)
    assert parts["l1"] == pytest.approx(float(torch.cat([v.flatten() for v in scores.values()]).mean()))


def test_consistency_gradient_flows_through_straight_through_hard_mask():
    """With noise 0 the soft mask is m itself, so d L_consis / dm = (grad via the soft path)
    + (grad w.r.t. the hard mask, passed straight through)."""
    net = tiny_net().eval().double()  # float64: the two paths sum the same terms in another order
    base = partial_scaled_init(prunable_weights(net), 0.3)
    base = {n: b.double() for n, b in base.items()}
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    spec = CarSpec.published(noise=0.0, lambda_stab=0, lambda_ratio=0, lambda_consis=1.0, lambda_l1=0)
    scores = {n: s.clone().requires_grad_(True) for n, s in base.items()}
    loss, _ = car_loss(net, scores, x, None, spec, prune_ratio=0.6)
    loss.backward()
    soft = {n: s.clone().requires_grad_(True) for n, s in base.items()}
    hard = {n: m.double().requires_grad_(True) for n, m in topk_mask(base, 0.6).items()}
    consistency_loss(masked_forward(net, x, soft), masked_forward(net, x, hard)).backward()
    for n in base:
        torch.testing.assert_close(scores[n].grad, soft[n].grad + hard[n].grad)
        assert hard[n].grad.abs().sum() > 0


def digits_small():
    return load_dataset("digits", seed=0)


@pytest.mark.parametrize("term", TERMS)
def test_search_runs_with_a_single_term_on(term):
    d = digits_small()
    net = build_model("small_cnn", 10, 1)
    # an untrained net has r < eta = 1 almost everywhere (zero gradient): eta = 0 keeps L_ratio active
    spec = CarSpec.published(eta=0.0, **{f"lambda_{t}": (1.0 if t == term else 0.0) for t in TERMS})
    x, y = d.train_x[:256], d.train_y[:256]
    seen = []

    def t_rec(xb, delta, index=None):
        seen.append(bool(torch.equal(xb, x[index])))  # index = dataset rows of the batch
        return brightness(xb, delta)

    before = {n: p.clone() for n, p in net.state_dict().items()}
    scores = search_mask(
        net, x, y, t_rec, spec, prune_ratio=0.5, scope="layer", epochs=1, batch_size=64, seed=0
    )
    init = init_scores(net, spec)
    assert set(scores) == set(init)
    assert any(not torch.equal(scores[n], init[n]) for n in scores)  # the term moved the mask
    assert all(s.min() >= 0 and s.max() <= 1 for s in scores.values())
    for n, p in net.state_dict().items():  # weights frozen
        assert torch.equal(p, before[n])
    assert all(p.requires_grad for p in net.parameters())  # restored
    assert (len(seen) > 0 and all(seen)) == (term == "ratio")
    if term == "l1":
        assert float(l1_loss(scores)) < float(l1_loss(init))


def test_ratio_under_the_hard_mask_is_eq6_of_the_top_k_network():
    """ratio_mask "hard": L_ratio is Eq. 6-7 computed from p_C*(x) and p_C*(T(x)), C* the top-k mask
    (checked against a forward of the in-place pruned network), and its gradient reaches the soft
    mask through the straight-through estimator; no noisy-mask pass is run when nothing needs it."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x = d.train_x[:64]
    x_t = brightness(x, torch.ones(len(x)))
    scores = {n: s.requires_grad_(True) for n, s in init_scores(net, CarSpec.published()).items()}
    spec = CarSpec.published(eta=0.0, ratio_mask="hard", lambda_stab=0.0, lambda_consis=0.0, lambda_l1=0.0)
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(1))
    loss, parts = car_loss(net, scores, x, x_t, spec, prune_ratio=0.5)
    hook.remove()
    assert len(calls) == 2  # C* on x and on T(x) only
    pruned = copy.deepcopy(net)
    apply_masks_(pruned, topk_mask(scores, 0.5))
    with torch.no_grad():
        p, p_t = pruned(x).softmax(-1), pruned(x_t).softmax(-1)
    top2 = p.topk(2, dim=-1).values
    r = (p - p_t).abs().amax(-1) / ((top2[:, 0] - top2[:, 1]) / 2 + RATIO_EPS)
    want = torch.nn.functional.softplus(torch.relu(r - 0.0)).mean()
    assert parts["ratio"] == pytest.approx(float(want), rel=1e-4)
    loss.backward()
    assert any(float(s.grad.abs().sum()) > 0 for s in scores.values())


def test_batch_statistics_search_runs_x_and_t_x_as_one_batch():
    """search_bn "batch": every pass sees x and T(x) together (2B rows) and normalises with that
    batch's statistics; L_ratio then equals Eq. 6-7 on the two halves of one forward of the network
    with weights theta * m and BatchNorm in training mode (noise 0, so C_m = m)."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x = d.train_x[:32]
    x_t = brightness(x, torch.ones(len(x)))
    spec = CarSpec.published(eta=0.0, noise=0.0, search_bn="batch", lambda_l1=0.0)
    scores = init_scores(net, spec)
    rows = []
    bnet = batch_stat_copy(net)
    bnet.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    _, parts = car_loss(bnet, scores, x, x_t, spec, prune_ratio=0.5)
    assert rows == [64, 64, 64]  # C_m, C_n, C* over x and x_t together
    ref = copy.deepcopy(net)
    apply_masks_(ref, scores)
    ref.train()
    with torch.no_grad():
        p = ref(torch.cat([x, x_t])).softmax(-1)
    assert parts["ratio"] == pytest.approx(float(ratio_loss(p[:32], p[32:], 0.0)), rel=1e-4)
    assert parts["stab"] == pytest.approx(0.0, abs=1e-12)  # noise 0: C_m = C_n
    # the search leaves the pretrained model's BatchNorm statistics and mode alone
    before = {k: v.clone() for k, v in net.state_dict().items()}
    search_mask(
        net,
        d.train_x[:128],
        d.train_y[:128],
        brightness,
        spec,
        prune_ratio=0.5,
        epochs=1,
        batch_size=64,
        seed=0,
    )
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net.training


def test_sgd_mask_optimizer_steps_along_the_gradient():
    """mask_optimizer "sgd": the first step is m - lr * grad (momentum buffer empty), then [0, 1]."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x = d.train_x[:64]
    spec = CarSpec.published(lambda_stab=0.0, lambda_ratio=0.0, lambda_consis=0.0, lambda_l1=1.0, mask_lr=0.5)
    scores = {n: s.clone().requires_grad_(True) for n, s in init_scores(net, spec).items()}
    init = {n: s.detach().clone() for n, s in scores.items()}
    opt = mask_optimizer(list(scores.values()), spec.mask_lr, "sgd")
    car_step(net, scores, opt, x, None, spec, prune_ratio=0.5)
    count = sum(s.numel() for s in init.values())  # dL1/dm = 1 / count for every entry (m >= 0)
    for n, s in scores.items():
        torch.testing.assert_close(s.detach(), (init[n] - 0.5 / count).clamp(0, 1))
    with pytest.raises(InvalidInput, match="mask optimizer"):
        mask_optimizer(list(scores.values()), 0.1, "lbfgs")


def test_amp_search_runs_the_passes_in_bf16_and_keeps_the_mask_fp32():
    d = digits_small()
    net = build_model("small_cnn", 10, 1)
    seen = []
    net.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scores = search_mask(
        net,
        d.train_x[:128],
        d.train_y[:128],
        brightness,
        CarSpec.published(eta=0.0),
        prune_ratio=0.5,
        epochs=1,
        batch_size=64,
        seed=0,
        amp=True,
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert all(s.dtype == torch.float32 and s.min() >= 0 and s.max() <= 1 for s in scores.values())


def test_search_all_lambdas_zero_is_a_no_op():
    d = digits_small()
    net = build_model("small_cnn", 10, 1)
    spec = CarSpec.published(lambda_stab=0, lambda_ratio=0, lambda_consis=0, lambda_l1=0)
    scores = search_mask(net, d.train_x[:64], d.train_y[:64], brightness, spec, prune_ratio=0.5, epochs=1,
                         batch_size=32, seed=0)  # fmt: skip
    init = init_scores(net, spec)
    assert all(torch.equal(scores[n], init[n]) for n in init)


@pytest.mark.parametrize("search_bn", ["frozen", "recalibrate"])
def test_search_resume_equals_uninterrupted_and_cancel(tmp_path, search_bn):
    d = digits_small()
    x, y = d.train_x[:192], d.train_y[:192]
    net = build_model("small_cnn", 10, 1)
    kw = dict(prune_ratio=0.5, scope="layer", batch_size=64, seed=4)
    spec = CarSpec.published(search_bn=search_bn, bn_every=2)  # 3 steps per epoch: refresh at 0 and 2
    straight = search_mask(net, x, y, brightness, spec, epochs=3, ctx=LocalContext(tmp_path / "a"), **kw)
    ctx = LocalContext(tmp_path / "b")
    search_mask(net, x, y, brightness, spec, epochs=2, ctx=ctx, **kw)
    resumed = search_mask(net, x, y, brightness, spec, epochs=3, ctx=ctx, **kw)
    for n in straight:
        assert torch.equal(straight[n], resumed[n])
    stop = LocalContext(tmp_path / "c", cancel_flag=lambda: True)
    with pytest.raises(Cancelled):
        search_mask(net, x, y, brightness, spec, epochs=1, ctx=stop, **kw)


def test_run_car_on_digits_exact_sparsity_and_accuracy_close_to_unpruned():
    d = digits_small()
    torch.manual_seed(0)
    dense = build_model("small_cnn", 10, 1)
    train_epochs(dense, d.train_x, d.train_y, epochs=20, lr=0.1, batch_size=64, seed=0)
    acc_dense = evaluate(dense, d.test_x, d.test_y)
    assert acc_dense > 0.9
    for pr, scope in [(0.5, "layer"), (0.7, "global")]:
        model = copy.deepcopy(dense)
        spec = PruningSpec(method="car", prune_ratio=pr, scope=scope, pretrain_epochs=0, search_epochs=3,
                           finetune_epochs=3, finetune_lr=0.01, batch_size=64, augment_q=200)  # fmt: skip
        masks = run_car(model, d, brightness, spec, seed=0)
        weights = prunable_weights(model)
        if scope == "layer":
            for n, w in weights.items():
                assert int(masks[n].sum()) == round((1 - pr) * w.numel())
        total = sum(w.numel() for w in weights.values())
        assert sum(int(m.sum()) for m in masks.values()) == round((1 - pr) * total)
        for n, w in weights.items():
            assert bool((w[~masks[n]] == 0).all())
        acc = evaluate(model, d.test_x, d.test_y)
        assert acc >= acc_dense - 0.05, (pr, scope, acc, acc_dense)


def test_search_nan_raises_training_diverged_and_writes_nothing(tmp_path):
    net = tiny_net()
    with torch.no_grad():
        net[3].weight[0, 0] = float("nan")
    ctx = LocalContext(tmp_path)
    x = torch.rand(32, 1, 8, 8)
    with pytest.raises(TrainingDiverged):
        search_mask(net, x, torch.zeros(32, dtype=torch.long), brightness, CarSpec.published(),
                    prune_ratio=0.5, epochs=1, batch_size=16, seed=0, ctx=ctx)  # fmt: skip
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_fold_batchnorm_is_the_same_masked_function():
    torch.manual_seed(0)
    model = random_bn_stats(build_model("resnet18", 10, 1))
    x = torch.rand(3, 1, 8, 8)
    scores = partial_scaled_init(prunable_weights(model), 0.3)
    from core.car import fold_batchnorm, frozen_eval

    with frozen_eval(model):
        net = fold_batchnorm(model)
        assert net is not model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        for masks in (scores, topk_mask(scores, 0.5)):
            with torch.no_grad():
                ref = masked_forward(model, x, masks)
                got = masked_forward(net, x, masks)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert model.training  # restored

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    u = Untraceable()
    assert fold_batchnorm(u) is u


# ------------------------------------------------------------------ issue 9: fixes, options, control
def test_search_transforms_only_original_rows_never_an_augmented_row_twice():
    """Rows at positions >= n_original already are T(x, 1) (augment_with_transform): L_ratio's
    x_T = T(x, 1) must come from the original rows only, never T(T(x))."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x0, y0 = d.train_x[:48], d.train_y[:48]
    aug = brightness(x0[:16], torch.ones(16))
    x, y = torch.cat([x0, aug]), torch.cat([y0, y0[:16]])
    seen: list[torch.Tensor] = []

    def spy(xb, delta, index=None):
        seen.append(xb.clone())
        return brightness(xb, delta)

    spec = CarSpec(lambda_stab=0.0, lambda_consis=0.0, lambda_l1=0.0)
    search_mask(net, x, y, spy, spec, prune_ratio=0.5, epochs=2, batch_size=20, seed=0, n_original=48)
    rows = torch.cat(seen)
    assert len(rows) == 2 * 48  # every original row once per epoch, no augmented row
    flat_orig = x0.flatten(1)
    for r in rows.flatten(1):
        assert bool((flat_orig == r).all(1).any()), "a transformed row is not an original row"


def test_random_sign_control_keeps_magnitudes_and_randomises_directions():
    """control "random_sign": with SGD (no momentum yet) the first update is lr * |g| * s with s = +-1,
    |update| equal to the true gradient step entry by entry, and about half the signs flipped."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x, y = d.train_x[:64], d.train_y[:64]
    x_t = brightness(x, torch.ones(len(x)))
    base = CarSpec(mask_lr=0.1, mask_optimizer="sgd", noise=0.0, lambda_stab=0.0)
    steps = {}
    for control in ("none", "random_sign"):
        spec = base.model_copy(update={"control": control, "project": False})
        scores = {n: s.clone().requires_grad_(True) for n, s in init_scores(net, spec).items()}
        init = {n: s.detach().clone() for n, s in scores.items()}
        opt = mask_optimizer(list(scores.values()), spec.mask_lr, "sgd")
        torch.manual_seed(5)
        car_step(net, scores, opt, x, x_t, spec, prune_ratio=0.5, y=y)
        steps[control] = torch.cat([(s.detach() - init[n]).flatten() for n, s in scores.items()])
    true, ctrl = steps["none"], steps["random_sign"]
    torch.testing.assert_close(ctrl.abs(), true.abs())
    live = true != 0
    agree = float((torch.sign(ctrl[live]) == torch.sign(true[live])).float().mean())
    n = int(live.sum())
    assert n > 1000
    assert abs(agree - 0.5) < 4 * 0.5 / math.sqrt(n)  # binomial(n, 1/2), 4 standard deviations


def test_anchor_is_cross_entropy_of_the_top_k_network():
    """lambda_ce: "ce" = CE(f(x; theta * C*), y) checked on the in-place pruned network; its
    gradient reaches the scores through the straight-through estimator."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x, y = d.train_x[:64], d.train_y[:64]
    spec = CarSpec(lambda_stab=0.0, lambda_ratio=0.0, lambda_consis=0.0, lambda_l1=0.0, lambda_ce=1.0)
    scores = {n: s.requires_grad_(True) for n, s in init_scores(net, spec).items()}
    loss, parts = car_loss(net, scores, x, None, spec, prune_ratio=0.6, y=y)
    pruned = copy.deepcopy(net)
    apply_masks_(pruned, topk_mask(scores, 0.6))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(pruned(x), y)
    assert parts == {"ce": pytest.approx(float(want), rel=1e-5)}
    loss.backward()
    assert any(float(s.grad.abs().sum()) > 0 for s in scores.values())
    with pytest.raises(InvalidInput, match="labels"):
        car_loss(net, scores, x, None, spec, prune_ratio=0.6)


def test_ratio_rows_correct_and_cap_against_a_per_row_formula():
    """ratio_rows "correct" averages Eq. 7 over the rows the network classifies correctly; ratio_cap
    clips r first; no correct row gives 0 with a graph."""
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.05, 0.85]])
    p_t = torch.tensor([[0.2, 0.7, 0.1], [0.4, 0.3, 0.3], [0.89, 0.06, 0.05]])
    y = torch.tensor([0, 1, 2])

    def one(pp, pt, cap):
        z = max(abs(a - b) for a, b in zip(pp, pt, strict=True))
        s = sorted(pp, reverse=True)
        r = min(z / ((s[0] - s[1]) / 2 + RATIO_EPS), cap)
        return math.log1p(math.exp(max(r - 1.0, 0.0)))

    rows = p.argmax(-1) == y  # rows 0 and 2
    want = (one(p[0].tolist(), p_t[0].tolist(), 3.0) + one(p[2].tolist(), p_t[2].tolist(), 3.0)) / 2
    assert float(ratio_loss(p, p_t, 1.0, cap=3.0, rows=rows)) == pytest.approx(want, rel=1e-6)
    every = sum(one(a, b, 3.0) for a, b in zip(p.tolist(), p_t.tolist(), strict=True)) / 3
    assert float(ratio_loss(p, p_t, 1.0, cap=3.0)) == pytest.approx(every, rel=1e-6)
    pg = p.clone().requires_grad_(True)
    none = ratio_loss(pg, p_t, 1.0, rows=torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_balanced_lambdas_equalise_the_term_gradient_norms_at_init():
    """balance: term_grad_norms equals a fresh backward of each term alone, and the rescaled
    lambdas make lambda_k' ||g_k|| the same for every active term (the geometric mean of the norms)."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    x, y = d.train_x[:64], d.train_y[:64]
    x_t = brightness(x, torch.ones(len(x)))
    # noise 0 makes the terms deterministic (L_stab is then identically 0: switched off)
    spec = CarSpec(noise=0.0, eta=0.0, lambda_stab=0.0, lambda_ce=1.0, balance=True)
    scores = {n: s.clone().requires_grad_(True) for n, s in init_scores(net, spec).items()}
    parts = car_terms(net, scores, x, x_t, spec, prune_ratio=0.5, y=y)
    norms = term_grad_norms(parts, scores)
    for k in parts:
        fresh = {n: s.detach().clone().requires_grad_(True) for n, s in scores.items()}
        car_terms(net, fresh, x, x_t, spec, prune_ratio=0.5, y=y)[k].backward()
        want = math.sqrt(sum(float(s.grad.square().sum()) for s in fresh.values() if s.grad is not None))
        assert norms[k] == pytest.approx(want, rel=1e-4)
    lam = balanced_lambdas(spec, norms)
    weighted = [lam[k] * norms[k] for k in parts]
    gmean = math.exp(sum(math.log(norms[k]) for k in parts) / len(parts))
    assert weighted == pytest.approx([gmean] * len(parts), rel=1e-9)
    report: dict = {}
    search_mask(net, x, y, brightness, spec, prune_ratio=0.5, epochs=1, batch_size=64, seed=0, report=report)
    assert set(report["term_grad_norms"]) == set(parts) and set(report["lambdas"]) == set(parts)


def test_unprojected_scores_leave_the_unit_interval():
    """project False keeps the scores unclamped (the paper clips only the noisy masks); binarization
    uses |m|."""
    d = digits_small()
    net = build_model("small_cnn", 10, 1).eval()
    spec = CarSpec(
        lambda_stab=0.0, lambda_ratio=0.0, lambda_consis=0.0, lambda_ce=1.0, mask_lr=0.05, project=False
    )
    m = search_mask(
        net,
        d.train_x[:128],
        d.train_y[:128],
        brightness,
        spec,
        prune_ratio=0.5,
        epochs=2,
        batch_size=64,
        seed=0,
    )
    allm = torch.cat([v.flatten() for v in m.values()])
    assert float(allm.max()) > 1.0


def _fit_pca(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, transform, points: int = 6
) -> tuple[float, float]:
    """(accuracy, PCA proxy) on (x, y): correct and max_delta Z(x; T(x, delta)) < d(x) on a delta grid."""
    net.eval()
    with torch.no_grad():
        p = net(x).softmax(-1)
        top2 = p.topk(2, -1).values
        d = (top2[:, 0] - top2[:, 1]) / 2
        z = torch.zeros(len(x))
        for g in torch.linspace(0, 1, points):
            z = torch.maximum(
                z, (p - net(transform(x, torch.full((len(x),), float(g)))).softmax(-1)).abs().amax(-1)
            )
    correct = p.argmax(-1) == y
    return float(correct.float().mean()), float((correct & (z < d)).float().mean())


def test_default_search_carries_signal_beyond_its_random_sign_control_and_lmp():
    """The decisive experiment in small (bench/RESULTS.md, "CAR: the decisive experiment"): on a fixed
    fit set, the binarized mask of the default search (BatchNorm re-estimated, no fine-tune) is more
    certifiable than the same search with random-sign gradients and than LMP (its starting point), and
    Eq. 9 as published ends below its accuracy (the collapse)."""
    from core.spec import TransformSpec
    from core.training import recalibrate_batchnorm
    from core.transforms import build_transform

    d = digits_small()
    rot = build_transform(TransformSpec(name="rotation", strength=1.5), data=d, split="train")
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1)
    train_epochs(net, d.train_x, d.train_y, epochs=10, lr=0.05, batch_size=128, seed=0)
    x, y = d.train_x[:256], d.train_y[:256]

    def score(masks) -> tuple[float, float]:
        pruned = copy.deepcopy(net)
        apply_masks_(pruned, masks)
        recalibrate_batchnorm(pruned, x)
        return _fit_pca(pruned, x, y, rot)

    weights = prunable_weights(net)
    lmp = score(topk_mask(weights, 0.7))
    out = {}
    for name, spec in {
        "default": CarSpec(),
        "control": CarSpec(control="random_sign"),
        "paper": CarSpec.published(),
    }.items():
        m = search_mask(
            copy.deepcopy(net), x, y, rot, spec, prune_ratio=0.7, epochs=40, batch_size=128, seed=0
        )
        out[name] = score(topk_mask(m, 0.7, tiebreak=weights))
    assert out["default"][1] > out["control"][1] + 0.08, (out, lmp)
    assert out["default"][1] > lmp[1] + 0.08, (out, lmp)
    assert out["default"][0] >= lmp[0] - 0.02, (out, lmp)
    assert out["paper"][0] < out["default"][0] - 0.2, out


def _loss_and_grads(net, spec, x, x_t, y, seed=0):
    scores = {
        n: s.clone().requires_grad_(True) for n, s in partial_scaled_init(prunable_weights(net), 0.3).items()
    }
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(seed)  # the same noisy masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = car_loss(net, scores, x, x_t, spec, prune_ratio=0.5, y=y)
    loss.backward()
    return float(loss.detach()), {n: s.grad for n, s in scores.items()}, saved[0]


@pytest.mark.parametrize("search_bn", ["frozen", "batch"])
def test_checkpointed_search_passes_give_the_same_gradients_and_keep_less(search_bn):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 5),
    ).eval()
    if search_bn == "batch":
        net = batch_stat_copy(net)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 5, (16,))
    x_t = brightness(x, torch.ones(16))
    runs = {}
    for mode in ("off", "on"):
        spec = CarSpec(checkpoint=mode, search_bn=search_bn, eta=0.0, ratio_rows="all")
        runs[mode] = _loss_and_grads(net, spec, x, x_t, y)
    (l_off, g_off, saved_off), (l_on, g_on, saved_on) = runs["off"], runs["on"]
    assert l_on == pytest.approx(l_off, abs=1e-6)
    for name in g_off:
        assert torch.allclose(g_on[name], g_off[name], atol=1e-6), name
        assert g_off[name].abs().sum() > 0
    # outside the recomputed passes autograd keeps only their inputs/outputs: a fraction of the
    # activations every pass keeps without checkpointing
    assert saved_on < 0.5 * saved_off


def test_checkpoint_auto_turns_on_from_64x64_inputs():
    from core.car import uses_checkpointing

    auto, on, off = CarSpec(), CarSpec(checkpoint="on"), CarSpec(checkpoint="off")
    small, large = torch.zeros(2, 3, 28, 28), torch.zeros(2, 3, 64, 64)
    assert not uses_checkpointing(auto, small) and uses_checkpointing(auto, large)
    assert uses_checkpointing(on, small) and not uses_checkpointing(off, large)


@pytest.mark.parametrize("ratio, cap, tau_used", [(0.9, True, 0.1), (0.9, False, 0.3), (0.5, True, 0.3),
                                                  (0.7, True, 0.3)])
def test_tau_is_capped_at_the_kept_fraction(ratio: float, cap: bool, tau_used: float) -> None:
    """With tau_cap the init's plateau of entries at 1 holds round(min(tau, 1 - ratio) n) entries per
    layer, the kept count (so top-k of the init is LMP's mask, no tie left to the search's noise);
    counted directly on the scores, and the plateau's members are the largest |theta|."""
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1)
    spec = CarSpec(tau=0.3, tau_cap=cap)
    scores = init_scores(net, spec, prune_ratio=ratio)
    for name, w in prunable_weights(net).items():
        ones = scores[name].flatten() == 1.0
        assert int(ones.sum()) == max(1, round(tau_used * w.numel())), name
        a = w.detach().abs().flatten()
        assert a[ones].min() >= a[~ones].max(), name
    assert init_scores(net, CarSpec.published(), prune_ratio=0.9).keys() == scores.keys()
    assert not CarSpec.published().tau_cap and CarSpec().tau_cap


# ------------------------------------------------------------------ search_bn "recalibrate"
def test_recalibrating_network_is_the_hard_masked_net_with_its_own_batch_statistics():
    """After refresh(scores) the search network computes, for every mask C, f(x; theta * C) with the
    BatchNorm statistics of the hard-masked network theta * topk(scores) (ties by |theta|): checked
    against a copy pruned in place whose statistics are the mean / unbiased variance of one batch."""
    from core.car import recalibrating_network

    torch.manual_seed(0)
    model = random_bn_stats(build_model("small_cnn", 10, 1))
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(200, 1, 8, 8)  # < SEARCH_BN_SAMPLES rows, < one forward batch: one batch of all 200
    scores = {n: torch.rand_like(w) for n, w in prunable_weights(model).items()}
    hard = topk_mask(scores, 0.8, tiebreak=prunable_weights(model))

    ref = copy.deepcopy(model)
    apply_masks_(ref, hard)
    for mod in ref.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    ref.train()
    with torch.no_grad():
        ref(x)
    ref.eval()
    unpruned_new_stats = copy.deepcopy(model).eval()
    unpruned_new_stats.load_state_dict({**model.state_dict(), **{
        k: v for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}})

    net, refresh = recalibrating_network(model, x, prune_ratio=0.8, scope="layer", seed=0)
    probe = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        stale = masked_forward(net, probe, hard)
        refresh(scores)
        got = masked_forward(net, probe, hard)
        soft = masked_forward(net, probe, scores)
        torch.testing.assert_close(got, ref(probe), rtol=1e-4, atol=1e-5)
        want_soft = masked_forward(unpruned_new_stats, probe, scores)
        torch.testing.assert_close(soft, want_soft, rtol=1e-4, atol=1e-5)
    assert (stale - got).abs().max() > 1e-2  # the statistics did change
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k


def test_recalibrate_search_refreshes_every_bn_every_steps_and_at_each_epoch_start(monkeypatch):
    import core.car as car

    d = digits_small()
    x, y = d.train_x[:192], d.train_y[:192]  # batch 64: 3 steps per epoch
    calls = []
    real = car.recalibrate_batchnorm
    monkeypatch.setattr(car, "recalibrate_batchnorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = build_model("small_cnn", 10, 1)
    for every, per_epoch in ((2, 2), (1, 3), (5, 1)):
        calls.clear()
        spec = CarSpec(search_bn="recalibrate", bn_every=every)
        search_mask(net, x, y, brightness, spec, prune_ratio=0.7, epochs=2, batch_size=64, seed=0)
        assert len(calls) == 2 * per_epoch, every
    for spec, ratio, n_calls in (
        (CarSpec(), 0.7, 0),  # auto below 0.8: frozen, never
        (CarSpec(search_bn="frozen"), 0.9, 0),
        (CarSpec(), 0.9, 1),  # auto from 0.8 up: recalibrate (bn_every 10 > 3 steps: at the epoch start)
        (CarSpec(search_bn="recalibrate"), 0.5, 1),
    ):
        calls.clear()
        search_mask(net, x, y, brightness, spec, prune_ratio=ratio, epochs=1, batch_size=64, seed=0)
        assert len(calls) == n_calls, (spec.search_bn, ratio)


def test_search_bn_auto_switches_at_the_documented_ratio():
    """auto is frozen just below SEARCH_BN_RECALIBRATE_FROM and recalibrate from it up, and the field's
    description (the CLI's and the API's help) states that same ratio."""
    from core.car import resolved_search_bn
    from core.spec import SEARCH_BN_RECALIBRATE_FROM as at

    assert resolved_search_bn(CarSpec(), at - 1e-9) == "frozen"
    assert resolved_search_bn(CarSpec(), at) == "recalibrate"
    assert resolved_search_bn(CarSpec(search_bn="frozen"), 0.99) == "frozen"
    assert f"prune ratio {at:g} up" in CarSpec.model_fields["search_bn"].description
