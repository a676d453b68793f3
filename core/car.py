"""CAR: compression-aware semantic robustness (paper Algorithm 1, Eq. 5-9; METHOD.md "CAR").

Mask search (Algorithm 1 line 3) optimises the soft mask m in [0, 1] of every prunable weight
with the weights theta_pre frozen, for

    L_CAR = l_stab L_stab + l_ratio L_ratio + l_consis L_consis + l_L1 L_L1          (Eq. 9)

Decisions the paper leaves open (documented here and in the final report):
- compression instances C ~ Q_phi are noisy masks m' = clip(m + U(-delta_n, delta_n), 0, 1);
- L_ratio uses the probabilities of the first noisy mask C_m for both x and T(x, 1), so the clean
  pass under C_m is shared by L_stab, L_ratio and L_consis: one step costs four forward passes
  (C_m on x, C_n on x, C_m on T(x), C* on x) and one backward of the summed loss; a term whose
  lambda is 0 is not computed and its forward pass is skipped (ablations, Tables 3-5);
- BatchNorm (CarSpec.search_bn): "frozen" runs the network in eval mode (the pretrained running
  statistics, i.e. all of theta_pre frozen; BN folded into the preceding conv, `fold_batchnorm`,
  the same function, cheaper); "batch" lets each masked network normalise with its own batch
  statistics (`batch_stat_copy`), as the pruned network does once its statistics are re-estimated
  after binarization, and then runs x and T(x) as one batch so the statistics cannot normalise the
  transformation away (three passes over 2B rows instead of four over B);
- the optimiser is Adam (or SGD, CarSpec.mask_optimizer) on m at CarSpec.mask_lr, and m is
  projected back to [0, 1] after every step (a mask lives in [0, 1], Sec. 2.2);
- L_ratio is evaluated under C_m (CarSpec.ratio_mask "soft") or under the straight-through hard
  mask C* whose Z the certificate bounds ("hard");
- eps of Eq. 6 is RATIO_EPS = 1e-3.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.context import StageContext
from core.errors import InvalidInput
from core.masking import (
    masked_forward,
    partial_scaled_init,
    prunable_weights,
    random_init,
    straight_through_mask,
    topk_mask,
)
from core.spec import CarSpec, PruningSpec
from core.training import (
    augment_with_transform,
    autocast,
    check_finite,
    model_device,
    pretrain,
    prune_and_finetune,
    run_epochs,
)

if TYPE_CHECKING:
    from core.data import DatasetSplit

RATIO_EPS = 1e-3


def noisy_masks(scores: Mapping[str, Tensor], noise: float) -> dict[str, Tensor]:
    """One compression instance C ~ Q_phi: m' = clip(m + U(-delta_n, delta_n), 0, 1) (METHOD.md).
    Differentiable in m (zero gradient where clipped). Uses the global torch RNG. noise = 0 gives
    m itself (the search keeps m in [0, 1] by projection)."""
    if noise == 0:
        return dict(scores)
    return {n: (m + torch.empty_like(m).uniform_(-noise, noise)).clamp(0.0, 1.0) for n, m in scores.items()}


def stability_loss(p_m: Tensor, p_n: Tensor) -> Tensor:
    """Eq. 5: L_stab = E_x ||p_Cm(x) - p_Cn(x)||_2^2 for two independent compression instances
    (batch mean of the squared L2 distance of the probability vectors). Its expectation over
    (C_m, C_n) is 2 E_C ||p_C(x) - p_bar(x)||^2 (Appendix A.3)."""
    return (p_m - p_n).square().sum(dim=-1).mean()


def margin(p: Tensor) -> Tensor:
    """d(x) = (p1 - p2) / 2 with p1 >= p2 the two largest probabilities (METHOD.md, Notation)."""
    top2 = p.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) / 2


def ratio_loss(p: Tensor, p_t: Tensor, eta: float, eps: float = RATIO_EPS) -> Tensor:
    """Eq. 6-7: r = Z / (d + eps) with Z = ||p(x) - p(T(x))||_inf and d = margin(p(x));
    L_ratio = E softplus(max(r - eta, 0)) (batch mean; softplus(0) = log 2 is its floor)."""
    z = (p - p_t).abs().amax(dim=-1)
    r = z / (margin(p) + eps)
    return F.softplus(F.relu(r - eta)).mean()


def consistency_loss(logits_soft: Tensor, logits_hard: Tensor) -> Tensor:
    """Eq. 8: L_consis = E_x KL(p_Cm(x) || p_C*(x)) = E sum_k p_Cm,k (log p_Cm,k - log p_C*,k),
    from logits (log-softmax for stability); C* the hard top-k mask (straight-through)."""
    log_s = F.log_softmax(logits_soft, dim=-1)
    log_h = F.log_softmax(logits_hard, dim=-1)
    return (log_s.exp() * (log_s - log_h)).sum(dim=-1).mean()


def l1_loss(scores: Mapping[str, Tensor]) -> Tensor:
    """Eq. 9's L_L1 = mean |m| over every entry of every layer's soft mask."""
    total = sum(s.abs().sum() for s in scores.values())
    count = sum(s.numel() for s in scores.values())
    return total / max(1, count)


def car_loss(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    x: Tensor,
    x_t: Tensor | None,
    spec: CarSpec,
    *,
    prune_ratio: float,
    scope: str = "layer",
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 9 on one batch, sharing forward passes (module docstring). x_t = T(x, 1) (needed only
    when lambda_ratio > 0). With spec.search_bn "batch" every pass runs on x and x_t as one batch
    (shared BatchNorm statistics, so Z is not normalised away; L_stab and L_consis then cover x and
    x_T, terms (A) and (C) of Eq. 4). Returns (total loss, {term: value}) with the active terms."""
    parts: dict[str, Tensor] = {}
    if spec.lambda_ratio > 0 and x_t is None:
        raise InvalidInput("lambda_ratio > 0 needs the transformed batch x_t")
    ratio_hard = spec.lambda_ratio > 0 and spec.ratio_mask == "hard"
    ratio_soft = spec.lambda_ratio > 0 and not ratio_hard
    joint = spec.search_bn == "batch" and x_t is not None
    xb = torch.cat([x, x_t]) if joint else x
    logits_m = p_m = mask_m = None
    if spec.lambda_stab > 0 or spec.lambda_consis > 0 or ratio_soft:
        mask_m = noisy_masks(scores, spec.noise)
        logits_m = masked_forward(model, xb, mask_m)
        p_m = F.softmax(logits_m, dim=-1)
    if spec.lambda_stab > 0:
        p_n = F.softmax(masked_forward(model, xb, noisy_masks(scores, spec.noise)), dim=-1)
        parts["stab"] = stability_loss(p_m, p_n)
    hard = logits_h = None
    if spec.lambda_consis > 0 or ratio_hard:
        hard = straight_through_mask(scores, prune_ratio, scope)
        logits_h = masked_forward(model, xb, hard)
    if spec.lambda_ratio > 0:
        # Z and d under the noisy soft mask C_m, or under the deployed network C* (Eq. 3)
        p_r, mask_r = (F.softmax(logits_h, dim=-1), hard) if ratio_hard else (p_m, mask_m)
        if joint:
            parts["ratio"] = ratio_loss(p_r[: len(x)], p_r[len(x) :], spec.eta)
        else:
            parts["ratio"] = ratio_loss(p_r, F.softmax(masked_forward(model, x_t, mask_r), dim=-1), spec.eta)
    if spec.lambda_consis > 0:
        parts["consis"] = consistency_loss(logits_m, logits_h)
    if spec.lambda_l1 > 0:
        parts["l1"] = l1_loss(scores)
    lam = {
        "stab": spec.lambda_stab,
        "ratio": spec.lambda_ratio,
        "consis": spec.lambda_consis,
        "l1": spec.lambda_l1,
    }
    if not parts:
        return torch.zeros((), device=x.device), {}
    total = sum(lam[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def init_scores(model: nn.Module, spec: CarSpec, seed: int = 0) -> dict[str, Tensor]:
    """Algorithm 1 line 2: partial-scaled init with spec.tau, or random (ablation, Table 4)."""
    weights = prunable_weights(model)
    if spec.init == "random":
        return random_init(weights, seed)
    return partial_scaled_init(weights, spec.tau)


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter gradients inside (each parameter's requires_grad restored after): theta_pre
    stays fixed while a score search optimises the mask (CAR here, HYDRA in core.baselines)."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        yield model
    finally:
        for p, req in frozen:
            p.requires_grad_(req)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The mask search's view of theta_pre: eval mode and no parameter gradients (restored after)."""
    was_training = model.training
    try:
        model.eval()
        with frozen_params(model):
            yield model
    finally:
        model.train(was_training)


def mask_optimizer(params: list[Tensor], lr: float, kind: str = "adam") -> torch.optim.Optimizer:
    """The optimiser of the mask scores: Adam, or SGD with momentum 0.9 (`kind` "sgd"); fused
    kernels where the device supports them (one pass over m)."""
    if kind not in ("adam", "sgd"):
        raise InvalidInput(f"unknown mask optimizer {kind!r}; valid: adam, sgd")

    def make(**fused: bool) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, **fused)
        return torch.optim.Adam(params, lr=lr, **fused)

    try:
        return make(fused=True)
    except (RuntimeError, ValueError):
        return make()


def score_params(init: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The optimised scores: leaf copies of the initial scores on `device`, requiring grad."""
    return {n: s.to(device).clone().requires_grad_(True) for n, s in init.items()}


def score_checkpoint(
    scores: Mapping[str, Tensor], opt: torch.optim.Optimizer
) -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """run_epochs' (state, load_state) for a score search: the scores (saved on the CPU, restored
    in place on their device) and the optimiser state."""

    def state() -> dict[str, Any]:
        return {"scores": {n: s.detach().cpu() for n, s in scores.items()}, "opt": opt.state_dict()}

    def load_state(st: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, s in scores.items():
                s.copy_(st["scores"][n].to(s.device))
        opt.load_state_dict(st["opt"])

    return state, load_state


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """The network the mask search runs: an eval-mode copy of `model` with every BatchNorm folded
    into the conv / linear before it (torch.fx conv-bn fusion), parameters frozen. With frozen
    running statistics BN(conv(x, w * m)) = conv(x, (w * s) * m) + b' (s, b' per output channel),
    so for every mask m it computes the same f(x; m * theta) as the model in eval mode, with one
    elementwise pass less per layer forward and backward (about 10% of a CAR step on CPU).
    Parameter names are unchanged, so masks apply as they are. A model that torch.fx cannot
    trace is returned as it is (the search is then only slower). Call inside `frozen_eval`."""
    if callable(getattr(model, "fold_batchnorm", None)):  # a torch.export program (core.program)
        return model.fold_batchnorm()
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model, inplace=False)
    except Exception:  # untraceable control flow: fall back to the unfused model (same results)
        return model
    if set(prunable_weights(fused)) != set(prunable_weights(model)):
        return model
    fused.eval()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


def batch_stat_copy(model: nn.Module) -> nn.Module:
    """The network a `search_bn="batch"` search runs: a copy of `model` (parameters frozen) in eval
    mode except its BatchNorm layers, which normalise with the statistics of each forward's own
    batch, as the pruned network will once its statistics are re-estimated after binarization
    (`core.training.recalibrate_batchnorm`); the running statistics this updates are the copy's."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def car_step(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    opt: torch.optim.Optimizer,
    x: Tensor,
    x_t: Tensor | None,
    spec: CarSpec,
    *,
    prune_ratio: float,
    scope: str = "layer",
    amp: bool = False,
) -> Tensor:
    """One mask-search step (inside `frozen_eval`): Eq. 9 on the batch (four shared forward
    passes), one backward of the summed loss, an optimiser step on m, projection onto [0, 1].
    Raises TrainingDiverged before updating on a NaN/inf loss. Returns the detached loss. amp: the
    forward passes under bf16 autocast (the mask and its update stay float32)."""
    opt.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        loss, _ = car_loss(model, scores, x, x_t, spec, prune_ratio=prune_ratio, scope=scope)
    check_finite(loss)
    if loss.requires_grad:
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s in scores.values():
                s.clamp_(0.0, 1.0)
    return loss.detach()


def search_mask(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    transform: Any,
    spec: CarSpec,
    *,
    prune_ratio: float,
    scope: str = "layer",
    epochs: int,
    batch_size: int,
    seed: int,
    ctx: StageContext | None = None,
    index: Tensor | None = None,
    stage: str = "search",
    checkpoint_key: str = "search",
    amp: bool = False,
) -> dict[str, Tensor]:
    """Algorithm 1 lines 2-3: initialise the soft mask and minimise Eq. 9 over it for `epochs`
    epochs with the model frozen (eval mode, no weight gradients). Returns the soft mask m
    (float in [0, 1], detached, on the model's device). `y` is not used by L_CAR (the loss is
    label-free); it is accepted for the common signature. transform(x, delta, index) gives x_T
    at delta = 1; `index` (default arange) are the dataset indices passed to it.
    Resumable per epoch through ctx (key `checkpoint_key`)."""
    dev = model_device(model)
    scores = score_params(init_scores(model, spec, seed), dev)
    opt = mask_optimizer(list(scores.values()), spec.mask_lr, spec.mask_optimizer)
    if index is None:
        index = torch.arange(len(x))

    def step(idx: Tensor) -> Tensor:
        xb = x[idx].to(dev, non_blocking=True)
        x_t = None
        if spec.lambda_ratio > 0:
            with torch.no_grad():
                ones = torch.ones(len(xb), device=dev)
                x_t = transform(xb, ones, index=index[idx].to(dev))
        return car_step(net, scores, opt, xb, x_t, spec, prune_ratio=prune_ratio, scope=scope, amp=amp)

    state, load_state = score_checkpoint(scores, opt)
    with frozen_eval(model):
        net = batch_stat_copy(model) if spec.search_bn == "batch" else fold_batchnorm(model)
        run_epochs(
            len(x),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            step=step,
            state=state,
            load_state=load_state,
            ctx=ctx,
            stage=stage,
            checkpoint_key=checkpoint_key,
        )
    return {n: s.detach() for n, s in scores.items()}


def run_car(
    model: nn.Module,
    data: DatasetSplit,
    transform: Any,
    spec: PruningSpec,
    *,
    seed: int,
    ctx: StageContext | None = None,
) -> dict[str, Tensor]:
    """Algorithm 1 end to end on `model` (modified in place): pretrain with cross-entropy
    (skipped when spec.pretrain_epochs == 0), search the soft mask (Eq. 9), binarize with exact
    top-k per layer / globally (line 4; ties in m broken by |theta|), re-estimate BatchNorm
    statistics of the pruned net, and fine-tune the weights under the fixed hard mask (line 5).
    All on the training set augmented with q = spec.augment_q samples T(x, 1). Returns the hard
    masks (bool)."""
    x, y, index = augment_with_transform(data.train_x, data.train_y, transform, spec.augment_q, seed)
    key = f"car-{spec.prune_ratio:.4f}-{spec.scope}"
    pretrain(model, x, y, spec, seed=seed, key=key, ctx=ctx)
    scores = search_mask(
        model,
        x,
        y,
        transform,
        spec.car,
        prune_ratio=spec.prune_ratio,
        scope=spec.scope,
        epochs=spec.search_epochs,
        batch_size=spec.batch_size,
        seed=seed,
        ctx=ctx,
        index=index,
        stage="search",
        checkpoint_key=f"{key}-search",
        amp=spec.amp,
    )
    hard = topk_mask(scores, spec.prune_ratio, spec.scope, tiebreak=prunable_weights(model))
    return prune_and_finetune(model, x, y, hard, spec, seed=seed, key=key, ctx=ctx)
