"""core.baselines: LMP vs torch.nn.utils.prune, L2 PGD vs the closed form on a linear model,
TRADES at eps 0, and the run_method dispatch (exact sparsity for every pruning method)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from core.baselines import advtrain_loss, hydra_scaled_init, hydra_search, pgd_l2, run_method, trades_loss
from core.context import LocalContext
from core.data import load_dataset
from core.errors import Cancelled, InvalidInput
from core.masking import prunable_weights
from core.methods import METHODS, prunes
from core.models import build_model
from core.spec import PruningSpec
from core.training import evaluate, train_epochs
from tests.unit.helpers import brightness, one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    m = build_model("small_cnn", 10, 1)
    train_epochs(m, digits.train_x, digits.train_y, epochs=6, lr=0.1, batch_size=64, seed=0)
    return m


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pr", [0.3, 0.6])
def test_lmp_mask_equals_torch_prune(digits, trained, scope, pr):
    model = copy.deepcopy(trained)
    ref = copy.deepcopy(trained)
    spec = PruningSpec(method="lmp", prune_ratio=pr, scope=scope, pretrain_epochs=0, finetune_epochs=1,
                       batch_size=64, augment_q=50)  # fmt: skip
    masks = run_method("lmp", model, digits, brightness, spec, seed=0)
    mods = dict(ref.named_modules())
    names = list(prunable_weights(ref))
    if scope == "layer":
        for n in names:
            mod = mods[n.rsplit(".", 1)[0]]
            k = mod.weight.numel()
            prune.l1_unstructured(mod, "weight", amount=k - round((1 - pr) * k))
    else:
        params = [(mods[n.rsplit(".", 1)[0]], "weight") for n in names]
        total = sum(m.weight.numel() for m, _ in params)
        prune.global_unstructured(params, prune.L1Unstructured, amount=total - round((1 - pr) * total))
    for n in names:
        want = mods[n.rsplit(".", 1)[0]].weight_mask.bool()
        assert torch.equal(masks[n], want), n
        w = prunable_weights(model)[n]
        assert bool((w[~want] == 0).all())


def test_pgd_l2_matches_closed_form_on_linear_model():
    """For logits W x (2 classes), grad_x CE is parallel to (W1 - W0) for every x, so L2 PGD
    moves x by exactly eps along -/+ (W1 - W0) / ||W1 - W0|| (box inactive)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    x = 0.4 + 0.2 * torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 0])
    eps = 0.15
    x_adv = pgd_l2(lin, x, lambda lo: F.cross_entropy(lo, y), eps=eps, steps=7)
    w = lin[1].weight.detach()
    u = (w[1] - w[0]) / (w[1] - w[0]).norm()
    sign = torch.where(y == 0, 1.0, -1.0).view(-1, 1)  # push towards the other class
    want = x.flatten(1) + eps * sign * u
    torch.testing.assert_close(x_adv.flatten(1), want, rtol=1e-5, atol=1e-6)
    # the ball and the box always hold
    torch.manual_seed(1)
    cnn = build_model("small_cnn", 10, 1)
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 10, (5,))
    x_adv = pgd_l2(cnn, x, lambda lo: F.cross_entropy(lo, y), eps=0.5, steps=5)
    assert bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(cnn(x_adv), y) > F.cross_entropy(cnn(x), y)
    assert torch.equal(pgd_l2(cnn, x, lambda lo: lo.sum(), eps=0.0, steps=5), x)


def test_trades_and_advtrain_losses_reduce_to_ce_at_eps_zero():
    torch.manual_seed(0)
    m = build_model("small_cnn", 10, 1)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    ce = F.cross_entropy(m(x), y)
    torch.testing.assert_close(trades_loss(0.0, 3)(m, x, y), ce)  # KL(p || p) = 0
    torch.testing.assert_close(advtrain_loss(0.0, 3)(m, x, y), 2 * ce)
    assert trades_loss(0.5, 3)(m, x, y) >= ce - 1e-6
    assert advtrain_loss(0.5, 3)(m, x, y) >= 2 * ce - 1e-6


def test_trades_gradient_stays_finite_for_a_confident_net():
    """Logit gaps of ~200 underflow softmax to exact zeros; the KL of TRADES must still have a finite
    gradient (p log p with p = 0 has a NaN derivative) and equal KL computed in float64."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.mul_(400.0)
    m = nn.Sequential(nn.Flatten(), lin)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    assert bool((F.softmax(m(x), -1) == 0).any())  # the case that used to give NaN
    loss = trades_loss(0.5, 2)(m, x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    # the KL term against a float64 recomputation at eps = 0 (x_adv = x): exactly 0
    torch.testing.assert_close(trades_loss(0.0, 2)(m, x, y), F.cross_entropy(m(x), y))


def test_unknown_method():
    with pytest.raises(InvalidInput, match="valid"):
        run_method("prune-it", nn.Linear(2, 2), None, brightness, PruningSpec(), seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_run_method_every_method(digits, method):
    d = copy.copy(digits)
    d.train_x, d.train_y = digits.train_x[:300], digits.train_y[:300]
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    before = copy.deepcopy(model.state_dict())
    pr = 0.6 if prunes(method) else 0.0
    spec = PruningSpec(method=method, prune_ratio=pr, pretrain_epochs=1, search_epochs=1, finetune_epochs=1,
                       batch_size=64, augment_q=40, adv_steps=2)  # fmt: skip
    masks = run_method(method, model, d, brightness, spec, seed=0)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # it trained
    if pr == 0:
        assert masks is None
        return
    for n, w in prunable_weights(model).items():
        assert masks[n].dtype == torch.bool
        assert int(masks[n].sum()) == round(0.4 * w.numel())
        assert bool((w[~masks[n]] == 0).all())
    assert 0.0 <= evaluate(model, d.test_x, d.test_y) <= 1.0


def test_hydra_scores_move_away_from_magnitude(digits, trained):
    """HYDRA starts at the magnitude mask (scaled init) and its TRADES score search changes it."""
    model = copy.deepcopy(trained)
    spec = PruningSpec(method="hydra", prune_ratio=0.5, pretrain_epochs=0, search_epochs=2, finetune_epochs=0,
                       batch_size=64, augment_q=0, adv_steps=2)  # fmt: skip
    from core.masking import topk_mask

    mag = topk_mask(prunable_weights(trained), 0.5)
    masks = run_method("hydra", model, digits, brightness, spec, seed=0)
    changed = sum(int((masks[n] != mag[n]).sum()) for n in mag)
    assert changed > 0


def test_hydra_scaled_init_is_kaiming_scaled_weight_over_its_max():
    """s = sqrt(6 / fan_in) * theta / max|theta| per layer, signed (HYDRA's scaled init)."""
    w = torch.tensor([[[[1.0, -2.0], [0.5, 4.0]]], [[[-8.0, 0.0], [2.0, 1.0]]]])  # (2, 1, 2, 2): fan_in 4
    s = hydra_scaled_init({"conv.weight": w})["conv.weight"]
    torch.testing.assert_close(s, math.sqrt(6 / 4) * w / 8.0)


def test_hydra_search_trains_scores_and_batchnorm_only_and_resumes_exactly(digits, tmp_path):
    """The reference recipe: conv/linear weights and biases stay fixed, BatchNorm affine parameters
    move; a search interrupted after two epochs and resumed (scores, SGD momentum, cosine schedule and
    BatchNorm parameters from the checkpoint) ends exactly where an uninterrupted one does."""
    torch.manual_seed(0)
    base = build_model("small_cnn", 10, 1)
    bn_names = {n for n, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_names, "small_cnn has BatchNorm"
    x, y = digits.train_x[:192], digits.train_y[:192]
    spec = PruningSpec(method="hydra", prune_ratio=0.5, search_epochs=3, batch_size=64, adv_steps=1)
    straight_net = copy.deepcopy(base)
    straight = hydra_search(straight_net, x, y, spec, seed=1, ctx=LocalContext(tmp_path / "a"))
    for name, p in straight_net.named_parameters():
        moved = not torch.equal(p, dict(base.named_parameters())[name])
        assert moved == (name.rsplit(".", 1)[0] in bn_names), name
    calls = iter(range(10_000))
    stop = LocalContext(tmp_path / "b", cancel_flag=lambda: next(calls) >= 2 * 3 + 1)  # 3 steps an epoch
    with pytest.raises(Cancelled):
        hydra_search(copy.deepcopy(base), x, y, spec, seed=1, ctx=stop)
    resumed_net = copy.deepcopy(base)
    resumed = hydra_search(resumed_net, x, y, spec, seed=1, ctx=LocalContext(tmp_path / "b"))
    for n in straight:
        assert torch.equal(straight[n], resumed[n])
    for (n, p), q in zip(straight_net.named_parameters(), resumed_net.parameters(), strict=True):
        assert torch.equal(p, q), n
