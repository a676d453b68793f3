"""Weight training and evaluation (Algorithm 1 lines 1 and 5; the baselines' training).

`run_epochs` is the one loop every optimisation in core shares (weights here, mask scores in
core.car and core.baselines): seeded per-epoch shuffling, NaN/inf check, cooperative cancel,
progress, and a checkpoint after every epoch from which a rerun resumes to the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.context import StageContext
from core.datasets import AugmentedImages, ImageSource, batch_stream, forward_batch
from core.errors import Cancelled, TrainingDiverged
from core.masking import apply_masks_, masked_forward, prunable_weights
from core.spec import PruningSpec
from core.trainform import channels_last_steps

Images = Tensor | ImageSource  # a split in memory or read on demand (core.datasets)
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
Augment = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


def ce_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy L_ce (Algorithm 1 lines 1 and 5)."""
    return F.cross_entropy(model(x), y)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision for a training forward pass: bf16 autocast on `device` when enabled (no
    loss scaling needed with bf16); a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index batches of one epoch: a permutation drawn from (seed, epoch) alone, so a resumed
    run sees the same batches. A trailing batch of a single sample is dropped (BatchNorm cannot
    train on it); it is back in the next epoch's permutation."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    batches = list(torch.split(perm, batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def check_finite(loss: Tensor) -> None:
    """Raise TrainingDiverged when the loss is NaN/inf (call it before backward/update)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise TrainingDiverged(f"loss became {loss.detach().flatten()[0].item()}")


def run_epochs(
    n: int,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    step: Callable[[Tensor], Tensor],
    state: Callable[[], dict[str, Any]],
    load_state: Callable[[dict[str, Any]], None],
    ctx: StageContext | None,
    stage: str,
    checkpoint_key: str,
    on_epoch_end: Callable[[int], None] | None = None,
    fetch: Callable[[list[Tensor]], Iterable[Any]] | None = None,
) -> None:
    """Run `epochs` epochs of `step(item) -> loss`, item = the batch's indices, or with `fetch`
    the items of fetch(the epoch's index batches) (e.g. core.datasets.batch_stream: (idx, x[idx],
    y[idx]), loaded ahead by worker processes). The step does backward + update,
    returns the detached loss, and must call `check_finite(loss)` before updating anything.
    Before the first epoch a checkpoint under `checkpoint_key` is loaded if present
    (`load_state`) and training resumes after its epoch; after every epoch {"epoch", "state":
    state()} is saved. A non-finite loss raises TrainingDiverged (nothing updated or saved for
    that step); ctx.should_cancel() is checked before every step (core.errors.Cancelled).
    Progress reported to ctx is the fraction of this stage done."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    start = 0
    if ctx is not None:
        ck = ctx.load_checkpoint(checkpoint_key)
        if ck is not None:
            load_state(ck["state"])
            start = int(ck["epoch"]) + 1
    if ctx is not None:
        ctx.progress(stage, start / max(1, epochs), f"epoch {start}/{epochs}")
    for epoch in range(start, epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout / noise RNG: same on resume
        batches = epoch_batches(n, batch_size, seed, epoch)
        total = 0.0
        for i, idx in enumerate(fetch(batches) if fetch is not None else batches):
            if ctx is not None and ctx.should_cancel():
                raise Cancelled(f"{stage} cancelled at epoch {epoch + 1}")
            try:
                loss = step(idx)
                check_finite(loss)
            except TrainingDiverged as e:
                raise TrainingDiverged(
                    f"{stage}: {e} at epoch {epoch + 1}, step {i + 1}; lower the learning rate or check"
                    " the data / weights"
                ) from None
            total += float(loss)
            if ctx is not None and (i % 20 == 0 or i == len(batches) - 1):
                frac = (epoch + (i + 1) / len(batches)) / epochs
                ctx.progress(stage, frac, f"epoch {epoch + 1}/{epochs} loss {total / (i + 1):.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if ctx is not None:
            ctx.save_checkpoint(checkpoint_key, {"epoch": epoch, "state": state()})


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _cosine_sgd(
    model: nn.Module, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum 0.9) on the trainable parameters, learning rate decayed from `lr` to 0 along a
    cosine over `total_steps` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    return opt, sched


def _apply_fixed_masks(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None, dev: torch.device
) -> dict[str, Tensor]:
    """The hard masks as the weights' dtype on `dev`, each weight multiplied by its mask in place."""
    if masks is None:
        return {}
    mask_t = {n: m.to(device=dev, dtype=weights[n].dtype) for n, m in masks.items()}
    with torch.no_grad():
        for n, m in mask_t.items():
            weights[n].mul_(m)
    return mask_t


def train_epochs(
    model: nn.Module,
    x: Images,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss_fn: LossFn | None = None,
    masks: Mapping[str, Tensor] | None = None,
    augment: Augment | None = None,
    ctx: StageContext | None = None,
    stage: str = "train",
    checkpoint_key: str = "train",
    weight_decay: float = WEIGHT_DECAY,
    amp: bool = False,
) -> None:
    """Train `model` in place: SGD (momentum 0.9, weight decay 5e-4), cosine learning-rate decay
    from `lr` to 0 over all steps, `loss_fn(model, xb, yb)` (default cross-entropy).

    masks: fixed hard masks (Algorithm 1 line 5): the weights are multiplied by them first, the
    gradient of every pruned entry is zeroed and the weights re-masked after every step, so pruned
    weights stay exactly 0. augment(xb, yb) -> (xb, yb) is applied to every batch. x, y stay on
    their device; batches are moved to the model's device (`stream_batches`: an ImageSource is
    read a batch at a time by DataLoader workers). Raises TrainingDiverged on a NaN/inf
    loss (nothing is updated or saved for that step), Cancelled on ctx.should_cancel(). amp: the
    loss's forward pass under bf16 autocast (`autocast`). CARCERT_TRAIN_FORM=channels_last runs the
    steps in channels_last (core.trainform); the model is contiguous again afterwards."""
    loss_fn = loss_fn or ce_loss
    dev = model_device(model)
    steps_per_epoch = max(1, len(epoch_batches(len(x), batch_size, seed, 0)))
    opt, sched = _cosine_sgd(model, lr, weight_decay, max(1, epochs * steps_per_epoch))
    weights = prunable_weights(model)
    mask_t = _apply_fixed_masks(weights, masks, dev)

    def step(item: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        xb, yb = item[1].to(dev, non_blocking=True), item[2].to(dev, non_blocking=True)
        if augment is not None:
            xb, yb = augment(xb, yb)
        xb = fmt(xb)
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            loss = loss_fn(model, xb, yb)
        check_finite(loss)
        loss.backward()
        with torch.no_grad():
            for n, m in mask_t.items():
                if weights[n].grad is not None:
                    weights[n].grad.mul_(m)
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, m in mask_t.items():
                weights[n].mul_(m)
        return loss.detach()

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}

    def load_state(s: dict[str, Any]) -> None:
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])

    with channels_last_steps(model) as fmt:  # core.trainform
        run_epochs(
            len(x), epochs=epochs, batch_size=batch_size, seed=seed, step=step, state=state,
            load_state=load_state, ctx=ctx, stage=stage, checkpoint_key=checkpoint_key,
            fetch=stream_batches(x, y, dev),
        )  # fmt: skip
    model.eval()


def stream_batches(x: Images, y: Tensor, dev: torch.device) -> Callable[[list[Tensor]], Iterable[Any]]:
    """run_epochs' `fetch` for a training loop on (x, y): core.datasets.batch_stream, with pinned
    memory when the model is on CUDA."""
    return lambda batches: batch_stream(x, y, batches, pin_memory=dev.type == "cuda")


def pretrain(
    model: nn.Module,
    x: Images,
    y: Tensor,
    spec: PruningSpec,
    *,
    seed: int,
    key: str,
    loss_fn: LossFn | None = None,
    ctx: StageContext | None = None,
) -> None:
    """Algorithm 1 line 1 (and every baseline's first stage): spec.pretrain_epochs of
    `loss_fn` (default cross-entropy) at spec.lr; skipped when spec.pretrain_epochs == 0 (user
    weights). Stage "pretrain", checkpoint key f"{key}-pretrain"."""
    if spec.pretrain_epochs > 0:
        train_epochs(
            model,
            x,
            y,
            epochs=spec.pretrain_epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            seed=seed,
            loss_fn=loss_fn,
            ctx=ctx,
            stage="pretrain",
            checkpoint_key=f"{key}-pretrain",
            amp=spec.amp,
        )


def prune_and_finetune(
    model: nn.Module,
    x: Images,
    y: Tensor,
    hard: Mapping[str, Tensor],
    spec: PruningSpec,
    *,
    seed: int,
    key: str,
    loss_fn: LossFn | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Tensor]:
    """Algorithm 1 line 5 (and every pruning baseline's last stage): apply the hard mask to the
    weights, re-estimate BatchNorm statistics of the pruned net, then spec.finetune_epochs of
    `loss_fn` at spec.finetune_lr under the fixed mask (seed + 1). Stage "finetune", checkpoint key
    f"{key}-finetune". Returns the hard mask on the CPU."""
    apply_masks_(model, hard)
    recalibrate_batchnorm(model, x, seed=seed)
    train_epochs(
        model,
        x,
        y,
        epochs=spec.finetune_epochs,
        lr=spec.finetune_lr,
        batch_size=spec.batch_size,
        seed=seed + 1,
        loss_fn=loss_fn,
        masks=hard,
        ctx=ctx,
        stage="finetune",
        checkpoint_key=f"{key}-finetune",
        amp=spec.amp,
    )
    return {n: m.cpu() for n, m in hard.items()}


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: Images, masks: Mapping[str, Tensor] | None = None, batch_size: int = 512
) -> Tensor:
    """Logits of `model` (eval mode) on x, batched (core.datasets.forward_batch); f(x; theta * m)
    when masks are given."""
    was = model.training
    model.eval()
    dev = model_device(model)
    outs = []
    batches = list(torch.arange(len(x)).split(forward_batch(batch_size, x.shape[1:])))
    for _, xb, _ in batch_stream(x, torch.zeros(len(x), dtype=torch.int64), batches):
        xb = xb.to(dev)
        outs.append((masked_forward(model, xb, masks) if masks else model(xb)).float().cpu())
    model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(
    model: nn.Module, x: Images, y: Tensor, masks: Mapping[str, Tensor] | None = None, batch_size: int = 512
) -> float:
    """Top-1 accuracy in [0, 1] (eval mode)."""
    if len(x) == 0:
        return 0.0
    pred = predict_logits(model, x, masks, batch_size).argmax(1)
    return float((pred == y.cpu()).float().mean())


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, x: Images, *, batch_size: int = 256, max_samples: int = 4096, seed: int = 0
) -> None:
    """Re-estimate BatchNorm running statistics of the (pruned) model: reset them and average
    the batch statistics (momentum None = cumulative) over up to `max_samples` training samples.
    Used after binarization, before fine-tuning, so the pruned network starts from statistics
    that match its own activations. No-op without BatchNorm."""
    bns = _batchnorms(model)
    if not bns or len(x) < 2:
        return
    was = model.training
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:max_samples]
    moms = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    batches = [b for b in torch.split(idx, forward_batch(batch_size, x.shape[1:])) if b.numel() > 1]
    for _, xb, _ in batch_stream(x, torch.zeros(len(x), dtype=torch.int64), batches):
        model(xb.to(dev))
    for bn, mom in zip(bns, moms, strict=True):
        bn.momentum = mom
    model.train(was)


@torch.no_grad()
def augment_with_transform(
    x: Images, y: Tensor, transform: Any, q: int, seed: int, *, batch_size: int = 256
) -> tuple[Images, Tensor, Tensor]:
    """The transform augmentation shared by every method (paper Sec. 3, METHOD.md): q training
    samples drawn without replacement (seeded) are transformed at the largest intensity,
    T(x_i, delta=1, index=i), and appended with their labels. q is capped at the training-set
    size (each sample is augmented at most once). Returns (x, y, index) where index[j] is the
    dataset index the row came from (what a precomputed transform needs). For an ImageSource x the
    rows are not materialised: x comes back as a core.datasets.AugmentedImages that transforms
    them when read (the same rows and values, computed per batch)."""
    n = len(x)
    index = torch.arange(n)
    q = min(int(q), n)
    if q <= 0 or transform is None:
        return x, y, index
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    pick = torch.randperm(n, generator=g)[:q].sort().values
    if isinstance(x, ImageSource):
        return AugmentedImages(x, transform, pick), torch.cat([y, y[pick]]), torch.cat([index, pick])
    parts = []
    for b in torch.split(pick, batch_size):
        xb = x[b]
        parts.append(transform(xb, torch.ones(len(b), device=xb.device), index=b.to(xb.device)).to(x.dtype))
    return torch.cat([x, *parts]), torch.cat([y, y[pick]]), torch.cat([index, pick])
