"""Methods compared in the paper (METHOD.md "Baselines") and the dispatch `run_method`.

Every method trains on the same data: the training set plus q = spec.augment_q samples
T(x, delta=1) (core.training.augment_with_transform; q capped at the training-set size).
Stage lengths: pretrain = spec.pretrain_epochs at spec.lr (skipped when 0, e.g. user weights),
mask search = spec.search_epochs, fine-tune = spec.finetune_epochs at spec.finetune_lr.

- vanilla: cross-entropy for pretrain_epochs; no pruning (returns None).
- advtrain: L = CE(f(x), y) + CE(f(x_adv), y), x_adv an L2 PGD attack (eps spec.adv_eps,
  spec.adv_steps steps of size 2.5 eps / steps, start at x, inputs kept in [0, 1]); no pruning.
- lmp: pretrain (CE), one-shot least-magnitude pruning (exact top-k of |theta|, spec.scope),
  fine-tune (CE) under the fixed mask.
- advtrain+lmp: the same with the advtrain loss in both pretrain and fine-tune.
- hydra (Sehwag et al. 2020), its reference recipe: pretrain (CE), scores with HYDRA's scaled init
  s = sqrt(6 / fan_in) theta / max|theta|, forward through the straight-through top-k mask of |s|
  under the TRADES loss CE(f(x), y) + 6 KL(p(x) || p(x_adv)) (x_adv: L2 PGD on that KL from
  x + 0.001 N(0, 1), same eps/steps as advtrain), weights frozen, BatchNorm affine parameters
  trainable and the network in train mode, SGD lr 0.1 momentum 0.9 weight decay 1e-4 with a cosine
  schedule; binarize; fine-tune with TRADES (HYDRA uses its robust loss in every stage); BatchNorm
  statistics are re-estimated after binarization.
- car: core.car.run_car (Algorithm 1).
After binarization every pruning method re-estimates BatchNorm statistics of the pruned net
(core.training.recalibrate_batchnorm) before fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.car import run_car, score_checkpoint, score_params
from core.context import StageContext
from core.data import DatasetSplit
from core.errors import InvalidInput
from core.masking import masked_forward, prunable_weights, topk_mask
from core.masking import straight_through_mask as st_mask
from core.methods import METHODS, method_info
from core.spec import PruningSpec
from core.training import (
    LossFn,
    augment_with_transform,
    autocast,
    ce_loss,
    check_finite,
    model_device,
    pretrain,
    prune_and_finetune,
    run_epochs,
    stream_batches,
)

TRADES_BETA = 6.0
HYDRA_LR, HYDRA_MOMENTUM, HYDRA_WEIGHT_DECAY = 0.1, 0.9, 1e-4  # HYDRA's pruning-phase SGD
Forward = Callable[[Tensor], Tensor]


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def pgd_l2(
    forward: Forward,
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    eps: float,
    steps: int,
    random_start: float = 0.0,
) -> Tensor:
    """L2 PGD maximising objective(forward(x')) over ||x' - x||_2 <= eps (per sample), x' in
    [0, 1]: `steps` normalised-gradient steps of size 2.5 eps / steps, each followed by the
    projection onto the ball and the box. Starts at x (+ random_start * N(0, 1) if > 0).
    Gradients are taken w.r.t. the input only (no parameter .grad is touched)."""
    if eps <= 0 or steps <= 0:
        return x.detach()
    alpha = 2.5 * eps / steps
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = torch.zeros_like(x) if random_start <= 0 else random_start * torch.randn_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = objective(forward((x + delta).clamp(0.0, 1.0)))
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta = delta + alpha * g / g_norm
            d_norm = delta.flatten(1).norm(dim=1).view(view)
            delta = delta * torch.clamp(eps / d_norm.clamp_min(1e-12), max=1.0)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).clamp(0.0, 1.0).detach()


def advtrain_loss(eps: float, steps: int) -> LossFn:
    """advtrain: CE(f(x), y) + CE(f(x_adv), y), x_adv = L2 PGD on the CE (attack in eval mode)."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with _eval_mode(model):
            x_adv = pgd_l2(model, x, lambda lo: F.cross_entropy(lo, y), eps=eps, steps=steps)
        return F.cross_entropy(model(x), y) + F.cross_entropy(model(x_adv), y)

    return loss


def trades_loss_fwd(
    forward: Forward,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    beta: float = TRADES_BETA,
) -> Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(p(x) || p(x_adv)), x_adv = L2 PGD
    maximising that KL from x + 0.001 N(0, 1) (attack in eval mode). The KL is computed from
    log-probabilities on both sides: a probability that underflows to 0 (a confident net) would
    make the gradient of p log p NaN."""
    with _eval_mode(model), torch.no_grad():
        logp_clean_attack = F.log_softmax(forward(x), dim=-1)

    def kl_obj(lo: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(lo, dim=-1), logp_clean_attack, reduction="sum", log_target=True)

    with _eval_mode(model):
        x_adv = pgd_l2(forward, x, kl_obj, eps=eps, steps=steps, random_start=0.001)
    logits = forward(x)
    log_p, log_p_adv = F.log_softmax(logits, dim=-1), F.log_softmax(forward(x_adv), dim=-1)
    kl = F.kl_div(log_p_adv, log_p, reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, y) + beta * kl


def trades_loss(eps: float, steps: int, beta: float = TRADES_BETA) -> LossFn:
    """TRADES as a train_epochs loss (the model's own forward)."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return trades_loss_fwd(model, model, x, y, eps=eps, steps=steps, beta=beta)

    return loss


def hydra_scaled_init(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """HYDRA's scaled score init: s = sqrt(6 / fan_in) * theta / max|theta| per layer (signed; the
    forward uses |s|), fan_in = the weight's entries per output unit."""
    out = {}
    for name, w in weights.items():
        w = w.detach().float()
        fan_in = w[0].numel()
        out[name] = (math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12)).contiguous()
    return out


@contextmanager
def _only_batchnorm_trainable(model: nn.Module):
    """HYDRA's pruning phase: every weight and bias frozen, BatchNorm affine parameters trainable
    (HYDRA freezes BN only on request); requires_grad restored after."""
    bn = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    }
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in bn)
        yield [p for p, _ in saved if id(p) in bn]
    finally:
        for p, req in saved:
            p.requires_grad_(req)


def hydra_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: PruningSpec,
    *,
    seed: int,
    ctx: StageContext | None = None,
    checkpoint_key: str = "hydra-search",
) -> dict[str, Tensor]:
    """HYDRA's score optimisation (the reference recipe): scores with HYDRA's scaled init, forward
    f(x; theta * C*(|s|)) with C* the straight-through top-k mask, TRADES loss, weights frozen but
    BatchNorm affine parameters trainable, network in train mode, SGD (lr HYDRA_LR, momentum 0.9,
    weight decay 1e-4) with a per-step cosine schedule to 0 over the search. Returns s."""
    dev = model_device(model)
    scores = score_params(hydra_scaled_init(prunable_weights(model)), dev)
    n_steps = max(1, spec.search_epochs * math.ceil(len(x) / spec.batch_size))

    def step(item: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        xb, yb = item[1].to(dev), item[2].to(dev)
        model.train()
        opt.zero_grad(set_to_none=True)
        mask = st_mask(scores, spec.prune_ratio, spec.scope)
        with autocast(dev, spec.amp):
            loss = trades_loss_fwd(
                lambda inp: masked_forward(model, inp, mask),
                model,
                xb,
                yb,
                eps=spec.adv_eps,
                steps=spec.adv_steps,
            )
        check_finite(loss)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    with _only_batchnorm_trainable(model) as bn_params:
        opt = torch.optim.SGD(
            [*scores.values(), *bn_params],
            lr=HYDRA_LR,
            momentum=HYDRA_MOMENTUM,
            weight_decay=HYDRA_WEIGHT_DECAY,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
        score_state, load_score_state = score_checkpoint(scores, opt)

        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

        def state() -> dict[str, Any]:
            # BatchNorm affine parameters and running statistics (the TRADES attack runs in eval mode)
            bn = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in bns]
            return {**score_state(), "sched": sched.state_dict(), "bn": bn}

        def load_state(st: dict[str, Any]) -> None:
            load_score_state(st)
            sched.load_state_dict(st["sched"])
            for m, sd in zip(bns, st["bn"], strict=True):
                m.load_state_dict(sd)

        run_epochs(
            len(x),
            epochs=spec.search_epochs,
            batch_size=spec.batch_size,
            seed=seed,
            step=step,
            state=state,
            load_state=load_state,
            ctx=ctx,
            stage="search",
            checkpoint_key=checkpoint_key,
            fetch=stream_batches(x, y, dev),
        )
    return {n: s.detach() for n, s in scores.items()}


def run_method(
    method: str,
    model: nn.Module,
    data: DatasetSplit,
    transform: Any,
    spec: PruningSpec,
    *,
    seed: int,
    ctx: StageContext | None = None,
) -> dict[str, Tensor] | None:
    """Train / prune `model` in place with `method` (module docstring); return the final hard
    mask (bool, CPU) or None for the unpruned methods (vanilla, advtrain). `transform` is the
    training-split T(x, delta, index); checkpoints are keyed by method, ratio and scope."""
    if method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "car":
        return run_car(model, data, transform, spec, seed=seed, ctx=ctx)
    x, y, _ = augment_with_transform(data.train_x, data.train_y, transform, spec.augment_q, seed)
    key = f"{method}-{spec.prune_ratio:.4f}-{spec.scope}"
    info = method_info(method)
    loss = advtrain_loss(spec.adv_eps, spec.adv_steps) if info.adversarial else ce_loss
    pretrain(model, x, y, spec, seed=seed, key=key, loss_fn=loss, ctx=ctx)
    if not info.prunes:
        return None
    weights = prunable_weights(model)
    if method == "hydra":
        scores = hydra_search(model, x, y, spec, seed=seed, ctx=ctx, checkpoint_key=f"{key}-search")
        hard = topk_mask(scores, spec.prune_ratio, spec.scope, tiebreak=weights)
        loss = trades_loss(spec.adv_eps, spec.adv_steps)
    else:
        hard = topk_mask(weights, spec.prune_ratio, spec.scope)
    return prune_and_finetune(model, x, y, hard, spec, seed=seed, key=key, loss_fn=loss, ctx=ctx)
