"""core.training: divergence, fixed masks, resume, cancel, evaluation, BN recalibration, augmentation."""

import copy

import pytest
import torch
from torch import nn

from core.context import LocalContext
from core.errors import Cancelled, TrainingDiverged
from core.masking import prunable_weights, topk_mask
from core.training import augment_with_transform, evaluate, recalibrate_batchnorm, train_epochs
from tests.unit.helpers import one_thread  # noqa: F401 (autouse fixture)


def net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


def data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) * 3).long().clamp(0, 2)
    return x, y


def test_nan_loss_raises_and_nothing_is_written_or_updated(tmp_path):
    model = net()
    before = copy.deepcopy(model.state_dict())
    x, y = data()
    ctx = LocalContext(tmp_path)

    def nan_loss(m, xb, yb):
        return m(xb).sum() * float("nan")

    with pytest.raises(TrainingDiverged, match="epoch 1, step 1"):
        train_epochs(model, x, y, epochs=2, lr=0.1, batch_size=32, seed=0, loss_fn=nan_loss, ctx=ctx)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # the forward itself updates BN stats
            assert torch.equal(v, before[k])
    # inf from a huge learning rate later in training is caught too
    with pytest.raises(TrainingDiverged):
        train_epochs(net(), x * 1e30, y, epochs=1, lr=1e30, batch_size=16, seed=0)


def test_fixed_masks_keep_pruned_weights_at_zero():
    model = net()
    x, y = data()
    masks = topk_mask(prunable_weights(model), 0.6)
    before = {n: p.detach().clone() for n, p in prunable_weights(model).items()}
    train_epochs(model, x, y, epochs=2, lr=0.1, batch_size=32, seed=0, masks=masks)
    for n, p in prunable_weights(model).items():
        assert bool((p[~masks[n]] == 0).all())
        assert not torch.equal(p[masks[n]], before[n][masks[n]])  # kept weights trained


def test_resume_equals_uninterrupted_and_cancel(tmp_path):
    x, y = data()
    a = net()
    train_epochs(a, x, y, epochs=3, lr=0.05, batch_size=32, seed=1, ctx=LocalContext(tmp_path / "a"))
    b = net()
    ctx = LocalContext(tmp_path / "b")
    with pytest.raises(Cancelled):
        train_epochs(b, x, y, epochs=3, lr=0.05, batch_size=32, seed=1, ctx=ctx, loss_fn=_stop_after(2))
    ck = ctx.load_checkpoint("train")
    assert ck is not None and ck["epoch"] == 1
    c = net()  # a fresh process: new model, same ctx -> resumes after epoch 2
    train_epochs(c, x, y, epochs=3, lr=0.05, batch_size=32, seed=1, ctx=ctx)
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k
    stop = LocalContext(tmp_path / "c", cancel_flag=lambda: True)
    with pytest.raises(Cancelled):
        train_epochs(net(), x, y, epochs=1, lr=0.05, batch_size=32, seed=1, ctx=stop)


def _stop_after(epochs: int):
    """CE loss that raises Cancelled (a simulated crash) once `epochs` epochs of 3 batches ran."""
    calls = [0]

    def loss(m, xb, yb):
        if calls[0] == epochs * 3:
            raise Cancelled("simulated crash")
        calls[0] += 1
        return nn.functional.cross_entropy(m(xb), yb)

    return loss


def test_resume_after_crash_wrapper(tmp_path):
    # the crash wrapper above stops training through an exception; the checkpoint of the last
    # full epoch survives (covered in test_resume_equals_uninterrupted_and_cancel)
    x, y = data()
    ctx = LocalContext(tmp_path)
    with pytest.raises(Cancelled):
        train_epochs(net(), x, y, epochs=3, lr=0.05, batch_size=32, seed=1, ctx=ctx, loss_fn=_stop_after(1))
    assert ctx.load_checkpoint("train")["epoch"] == 0


def test_evaluate_matches_manual_accuracy():
    model = net().eval()
    x, y = data(50)
    with torch.no_grad():
        want = (model(x).argmax(1) == y).float().mean().item()
    assert evaluate(model, x, y, batch_size=7) == pytest.approx(want)


def test_recalibrate_batchnorm_is_the_mean_of_batch_statistics():
    model = net().eval()
    x, _ = data(96)
    recalibrate_batchnorm(model, x, batch_size=32, max_samples=96)
    with torch.no_grad():
        h = model[0](x)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # cumulative average of the per-batch unbiased variances (equal batch sizes)
    idx = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    var = torch.stack([h[b].transpose(0, 1).flatten(1).var(1, unbiased=True) for b in idx.split(32)]).mean(0)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training


def test_augment_with_transform_appends_transformed_samples_and_caps_q():
    x, y = data(40)

    def t(xb, delta, index=None):
        assert torch.equal(xb, x[index]) and bool((delta == 1).all())
        return xb * 0.5

    xa, ya, idx = augment_with_transform(x, y, t, 10, seed=3)
    assert len(xa) == 50 and torch.equal(xa[:40], x) and torch.equal(idx[:40], torch.arange(40))
    pick = idx[40:]
    assert len(set(pick.tolist())) == 10
    assert torch.equal(xa[40:], x[pick] * 0.5) and torch.equal(ya[40:], y[pick])
    xa, ya, idx = augment_with_transform(x, y, t, 1000, seed=3)  # capped at the training-set size
    assert len(xa) == 80 and sorted(idx[40:].tolist()) == list(range(40))
    xa, _, _ = augment_with_transform(x, y, t, 0, seed=3)
    assert xa is x


def test_amp_runs_the_loss_forward_in_bf16_and_still_trains():
    x, y = data()
    model = net()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = evaluate(model, x, y)
    seen.clear()
    train_epochs(model, x, y, epochs=6, lr=0.1, batch_size=32, seed=0, amp=True)
    assert set(seen) == {torch.bfloat16}  # every training forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert evaluate(model, x, y) > max(before, 0.8)
    seen.clear()
    evaluate(model, x, y)
    assert seen == [torch.float32]  # evaluation is not autocast
