"""CAR: compression-aware semantic robustness (paper Algorithm 1, Eq. 5-9; METHOD.md "CAR").

Mask search (Algorithm 1 line 3) optimises the soft mask m of every prunable weight with the
weights theta_pre frozen, for

    L_CAR = l_stab L_stab + l_ratio L_ratio + l_consis L_consis + l_L1 L_L1 [+ l_ce L_ce]   (Eq. 9)

Eq. 9 alone is minimised by a collapsed, constant network (Z = 0, L_stab = L_consis = 0; measured:
chance accuracy after 300 steps, bench/RESULTS.md "CAR: the decisive experiment"). The product's
defaults (core.spec.CarSpec; CarSpec.published() is Eq. 9 as the paper states it) settle the choices
the paper leaves open by controlled experiments, each against a random-sign control:
- L_ce = CE(f(x; theta * C*), y), a task anchor under the hard mask (an extension: Alg. 1 line 3
  writes L_CAR(theta, m, x, y)); lambda_ce = 1;
- L_ratio under the straight-through hard mask C* (the network the certificate bounds), averaged over
  the rows C* classifies correctly (certification never counts the others), r capped at 10 (the
  lowest-margin rows otherwise dominate the loss);
- Adam at 0.001 on m (at 0.01 the mask drifts by noise), m projected onto [0, 1] after every step
  (CarSpec.project; unprojected scores are an option);
- x_T = T(x, 1) from the original rows only: the q augmented rows already are T(x, 1);
- compression instances C ~ Q_phi are noisy masks m' = clip(m + U(-delta_n, delta_n), 0, 1); the
  clean pass under C_m is shared by L_stab, L_consis (and L_ratio with ratio_mask "soft"); a term
  whose lambda is 0 is not computed and its forward pass is skipped (ablations, Tables 3-5);
- BatchNorm (CarSpec.search_bn): "frozen" runs the network in eval mode (the pretrained running
  statistics, folded into the preceding conv, `fold_batchnorm`); "batch" lets each masked network
  normalise with its own batch statistics over x and T(x) together (`batch_stat_copy`);
  "recalibrate" re-estimates the running statistics under the current hard mask C* every
  CarSpec.bn_every steps and at every epoch start (`recalibrating_network`), folded as "frozen";
  "auto" (default) is "recalibrate" from prune ratio 0.8 up and "frozen" below. Recalibration won at
  pr 0.9 on resnet18 / digits and in every seed of two small_cnn settings (+13 to +34 PCA points over
  frozen), won or tied at 0.8, and lost at 0.7 (resnet18 -5.7, Fashion-MNIST -15.9 over 3 seeds;
  bench/RESULTS.md "CAR over seeds");
- CarSpec.balance rescales the lambdas so that every term's gradient norm at init is the same;
  CarSpec.control "random_sign" is the control of every experiment (same gradient magnitudes,
  random signs);
- eps of Eq. 6 is RATIO_EPS = 1e-3;
- CarSpec.checkpoint: each forward pass of a step keeps only its input and output and recomputes its
  activations during the backward (torch.utils.checkpoint): the same gradients, with the memory of
  one pass instead of all of them (measured at 160 px, batch 32: 2.96 -> 1.59 GB peak RSS).
"""

from __future__ import annotations

import copy
import math
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
from core.preprocess import copy_normalize
from core.spec import SEARCH_BN_RECALIBRATE_FROM, CarSpec, PruningSpec
from core.trainform import channels_last_steps
from core.training import (
    augment_with_transform,
    autocast,
    check_finite,
    epoch_batches,
    model_device,
    pretrain,
    prune_and_finetune,
    recalibrate_batchnorm,
    run_epochs,
    stream_batches,
)

if TYPE_CHECKING:
    from core.data import DatasetSplit

RATIO_EPS = 1e-3
SEARCH_BN_SAMPLES = 512  # rows per BatchNorm re-estimation of search_bn "recalibrate"
CHECKPOINT_MIN_PIXELS = 64 * 64  # checkpoint "auto": on from this input size (H * W) up


def uses_checkpointing(spec: CarSpec, x: Tensor) -> bool:
    """Whether the search's forward passes on x are checkpointed: spec.checkpoint "on"/"off", or
    "auto" = inputs of at least CHECKPOINT_MIN_PIXELS pixels (where activations, not the model,
    set the memory of a step)."""
    if spec.checkpoint == "auto":
        return x.dim() >= 3 and x.shape[-1] * x.shape[-2] >= CHECKPOINT_MIN_PIXELS
    return spec.checkpoint == "on"


def search_forward(model: nn.Module, x: Tensor, masks: Mapping[str, Tensor], checkpointed: bool) -> Tensor:
    """f(x; theta * m) for the mask search; checkpointed, the pass's activations are recomputed
    during the backward instead of kept (non-reentrant torch.utils.checkpoint: gradients reach the
    masks captured by the closure; the recomputation is the same deterministic pass)."""
    if not checkpointed or not torch.is_grad_enabled():
        return masked_forward(model, x, masks)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(lambda inp: masked_forward(model, inp, masks), x, use_reentrant=False)


def noisy_masks(scores: Mapping[str, Tensor], noise: float) -> dict[str, Tensor]:
    """One compression instance C ~ Q_phi: m' = clip(m + U(-delta_n, delta_n), 0, 1) (METHOD.md).
    Differentiable in m (zero gradient where clipped). Uses the global torch RNG. noise = 0 gives
    m itself (in [0, 1] when the search projects m, CarSpec.project)."""
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


def ratio_loss(
    p: Tensor,
    p_t: Tensor,
    eta: float,
    eps: float = RATIO_EPS,
    *,
    cap: float | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """Eq. 6-7: r = Z / (d + eps) with Z = ||p(x) - p(T(x))||_inf and d = margin(p(x));
    L_ratio = E softplus(max(r - eta, 0)) (batch mean; softplus(0) = log 2 is its floor).
    cap: r <- min(r, cap) first (CarSpec.ratio_cap); rows: bool selection of the rows averaged
    (CarSpec.ratio_rows "correct"); no selected row gives a zero that keeps the graph."""
    z = (p - p_t).abs().amax(dim=-1)
    r = z / (margin(p) + eps)
    if cap is not None:
        r = r.clamp(max=cap)
    loss = F.softplus(F.relu(r - eta))
    if rows is None:
        return loss.mean()
    if not bool(rows.any()):
        return (loss * 0.0).sum()
    return loss[rows].mean()


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


def car_terms(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    x: Tensor,
    x_t: Tensor | None,
    spec: CarSpec,
    *,
    prune_ratio: float,
    scope: str = "layer",
    y: Tensor | None = None,
    t_rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """The active terms of Eq. 9 on one batch (a term whose lambda is 0 is not computed), sharing
    forward passes (module docstring), plus the task anchor "ce" = CE(f(x; theta * C*), y) when
    spec.lambda_ce > 0. x_t = T(x[t_rows], 1): the transformed originals (t_rows, int indices into
    x; default all rows), needed only when lambda_ratio > 0. With spec.search_bn "batch" every pass
    runs on x and x_t as one batch (shared BatchNorm statistics, so Z is not normalised away)."""
    parts: dict[str, Tensor] = {}
    use_ratio = spec.lambda_ratio > 0 and x_t is not None and len(x_t) > 0
    if spec.lambda_ratio > 0 and x_t is None:
        raise InvalidInput("lambda_ratio > 0 needs the transformed batch x_t")
    if (spec.lambda_ce > 0 or spec.ratio_rows == "correct") and y is None:
        raise InvalidInput("lambda_ce > 0 and ratio_rows 'correct' need the labels y")
    if t_rows is None:
        t_rows = torch.arange(len(x), device=x.device)
    ratio_hard = use_ratio and spec.ratio_mask == "hard"
    ratio_soft = use_ratio and not ratio_hard
    joint = spec.search_bn == "batch" and use_ratio
    xb = torch.cat([x, x_t]) if joint else x
    ckpt = uses_checkpointing(spec, x)
    logits_m = p_m = mask_m = None
    if spec.lambda_stab > 0 or spec.lambda_consis > 0 or ratio_soft:
        mask_m = noisy_masks(scores, spec.noise)
        logits_m = search_forward(model, xb, mask_m, ckpt)
        p_m = F.softmax(logits_m, dim=-1)
    if spec.lambda_stab > 0:
        p_n = F.softmax(search_forward(model, xb, noisy_masks(scores, spec.noise), ckpt), dim=-1)
        parts["stab"] = stability_loss(p_m, p_n)
    hard = logits_h = None
    if spec.lambda_consis > 0 or ratio_hard or spec.lambda_ce > 0:
        hard = straight_through_mask(scores, prune_ratio, scope)
        logits_h = search_forward(model, xb, hard, ckpt)
    if use_ratio:
        # Z and d under the noisy soft mask C_m, or under the deployed network C* (Eq. 3)
        p_r, mask_r = (F.softmax(logits_h, dim=-1), hard) if ratio_hard else (p_m, mask_m)
        p_x = p_r[: len(x)][t_rows]
        p_t = p_r[len(x) :] if joint else F.softmax(search_forward(model, x_t, mask_r, ckpt), dim=-1)
        rows = None
        if spec.ratio_rows == "correct":
            rows = p_x.detach().argmax(dim=-1) == y[t_rows]
        parts["ratio"] = ratio_loss(p_x, p_t, spec.eta, cap=spec.ratio_cap, rows=rows)
    if spec.lambda_consis > 0:
        parts["consis"] = consistency_loss(logits_m, logits_h)
    if spec.lambda_l1 > 0:
        parts["l1"] = l1_loss(scores)
    if spec.lambda_ce > 0:
        parts["ce"] = F.cross_entropy(logits_h[: len(x)], y)
    return parts


def term_lambdas(spec: CarSpec) -> dict[str, float]:
    """Eq. 9's lambdas (and the anchor's) by term name."""
    return {
        "stab": spec.lambda_stab,
        "ratio": spec.lambda_ratio,
        "consis": spec.lambda_consis,
        "l1": spec.lambda_l1,
        "ce": spec.lambda_ce,
    }


def car_loss(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    x: Tensor,
    x_t: Tensor | None,
    spec: CarSpec,
    *,
    prune_ratio: float,
    scope: str = "layer",
    y: Tensor | None = None,
    t_rows: Tensor | None = None,
    lambdas: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 9 on one batch: sum_k lambda_k L_k over `car_terms` (lambdas default: the spec's).
    Returns (total loss, {term: value}) with the active terms."""
    parts = car_terms(model, scores, x, x_t, spec, prune_ratio=prune_ratio, scope=scope, y=y, t_rows=t_rows)
    lam = term_lambdas(spec) if lambdas is None else lambdas
    if not parts:
        return torch.zeros((), device=x.device), {}
    total = sum(lam[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def term_grad_norms(parts: Mapping[str, Tensor], scores: Mapping[str, Tensor]) -> dict[str, float]:
    """||dL_k / dm||_2 over all score entries, for every term k (one backward each, graph kept)."""
    params = list(scores.values())
    out = {}
    for k, v in parts.items():
        grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        out[k] = float(
            torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(())))
        )
    return out


def balanced_lambdas(spec: CarSpec, norms: Mapping[str, float]) -> dict[str, float]:
    """CarSpec.balance: lambda_k' = lambda_k * G / ||g_k|| with G the geometric mean of the active
    terms' gradient norms at init, so every weighted term starts with a gradient of norm lambda_k G
    (terms with a zero gradient keep their lambda)."""
    lam = term_lambdas(spec)
    live = {k: v for k, v in norms.items() if v > 0 and lam[k] > 0}
    if not live:
        return lam
    g = math.exp(sum(math.log(v) for v in live.values()) / len(live))
    return {k: (lam[k] * g / live[k] if k in live else lam[k]) for k in lam}


def init_tau(spec: CarSpec, prune_ratio: float | None) -> float:
    """The init's tau: spec.tau, capped at the kept fraction 1 - prune_ratio when spec.tau_cap."""
    if spec.tau_cap and prune_ratio is not None:
        return min(spec.tau, 1.0 - prune_ratio)
    return spec.tau


def init_scores(model: nn.Module, spec: CarSpec, seed: int = 0, prune_ratio: float | None = None
                ) -> dict[str, Tensor]:
    """Algorithm 1 line 2: partial-scaled init with init_tau(spec, prune_ratio), or random
    (ablation, Table 4)."""
    weights = prunable_weights(model)
    if spec.init == "random":
        return random_init(weights, seed)
    return partial_scaled_init(weights, init_tau(spec, prune_ratio))


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
        return copy_normalize(model, model.fold_batchnorm())
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model, inplace=False)
    except Exception:  # untraceable control flow: fall back to the unfused model (same results)
        return model
    if set(prunable_weights(fused)) != set(prunable_weights(model)):
        return model
    copy_normalize(model, fused)  # the input normalisation (core.preprocess) is a hook fx skips
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


class _HardMasked(nn.Module):
    """f(x; theta * C) as a module (so core.training.recalibrate_batchnorm can run it): the wrapped
    model's own BatchNorm layers see the masked network's activations."""

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, x: Tensor) -> Tensor:
        return masked_forward(self.model, x, self.masks)


def recalibrating_network(
    model: nn.Module, x: Any, *, prune_ratio: float, scope: str, seed: int
) -> tuple[nn.Module, Callable[[Mapping[str, Tensor]], None]]:
    """The network a `search_bn="recalibrate"` search runs, and its refresh(scores). `stats` is a
    frozen copy of `model` whose BatchNorm running statistics refresh re-estimates under the
    current hard mask C* = topk_mask(scores) (ties by |theta|, as binarization), on the same
    SEARCH_BN_SAMPLES rows of x every time; the returned network is `stats` with those statistics
    folded into its (unmasked) weights (`fold_batchnorm`), updated in place. So every mask C the
    step applies is evaluated as f(x; theta * C) with the statistics of the network the search
    would deploy now, not of the unpruned one."""
    stats = copy.deepcopy(model).eval()
    for p in stats.parameters():
        p.requires_grad_(False)
    net, tiebreak = fold_batchnorm(stats), prunable_weights(model)

    def refresh(scores: Mapping[str, Tensor]) -> None:
        hard = topk_mask({n: s.detach() for n, s in scores.items()}, prune_ratio, scope, tiebreak=tiebreak)
        with torch.no_grad():
            recalibrate_batchnorm(_HardMasked(stats, hard), x, max_samples=SEARCH_BN_SAMPLES, seed=seed)
            stats.eval()
            if net is not stats:
                net.load_state_dict(fold_batchnorm(stats).state_dict())

    return net, refresh


def resolved_search_bn(spec: CarSpec, prune_ratio: float) -> str:
    """spec.search_bn with "auto" resolved: "recalibrate" when prune_ratio >= SEARCH_BN_RECALIBRATE_FROM
    (the pretrained statistics fit the pruned network worst there), else "frozen"."""
    if spec.search_bn != "auto":
        return spec.search_bn
    return "recalibrate" if prune_ratio >= SEARCH_BN_RECALIBRATE_FROM else "frozen"


def search_network(
    model: nn.Module, x: Any, spec: CarSpec, *, prune_ratio: float, scope: str, seed: int
) -> tuple[nn.Module, Callable[[Mapping[str, Tensor]], None] | None]:
    """(network the search runs, refresh(scores) or None) for spec.search_bn (module docstring)."""
    mode = resolved_search_bn(spec, prune_ratio)
    if mode == "recalibrate":
        return recalibrating_network(model, x, prune_ratio=prune_ratio, scope=scope, seed=seed)
    return (batch_stat_copy(model) if mode == "batch" else fold_batchnorm(model)), None


def random_sign_(grads: list[Tensor | None]) -> None:
    """The control of every CAR experiment: g <- |g| * s in place, s = +-1 uniformly (global RNG).
    Same per-entry magnitudes (so the same step sizes under Adam or SGD), no direction."""
    for g in grads:
        if g is not None:
            g.copy_(g.abs() * (torch.randint_like(g, 2) * 2 - 1))


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
    y: Tensor | None = None,
    t_rows: Tensor | None = None,
    lambdas: Mapping[str, float] | None = None,
) -> Tensor:
    """One mask-search step (inside `frozen_eval`): Eq. 9 on the batch (shared forward passes,
    `car_terms`), one backward of the summed loss, (control "random_sign": the gradient's signs
    randomised), an optimiser step on m, projection onto [0, 1] when spec.project. Raises
    TrainingDiverged before updating on a NaN/inf loss. Returns the detached loss. amp: the
    forward passes under bf16 autocast (the mask and its update stay float32)."""
    opt.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        loss, _ = car_loss(
            model,
            scores,
            x,
            x_t,
            spec,
            prune_ratio=prune_ratio,
            scope=scope,
            y=y,
            t_rows=t_rows,
            lambdas=lambdas,
        )
    check_finite(loss)
    if loss.requires_grad:
        loss.backward()
        if spec.control == "random_sign":
            random_sign_([s.grad for s in scores.values()])
        opt.step()
        if spec.project:
            with torch.no_grad():
                for s in scores.values():
                    s.clamp_(0.0, 1.0)
    return loss.detach()


def search_batch(
    x: Tensor, y: Tensor, idx: Tensor, index: Tensor, n_original: int, transform: Any, dev: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One search batch: (x, y, x_T, t_rows) on `dev`. t_rows are the batch rows at positions
    < n_original (original rows); x_T = T(x[t_rows], 1, index) (None without a transform): an
    augmented row already is T(x, 1) and is never transformed again."""
    return search_rows(x[idx], y[idx], idx, index, n_original, transform, dev)


def search_rows(
    xb: Tensor, yb: Tensor, idx: Tensor, index: Tensor, n_original: int, transform: Any, dev: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """search_batch on rows already read: xb = x[idx], yb = y[idx]."""
    xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
    t_rows = (idx < n_original).nonzero().flatten()
    x_t = None
    if transform is not None:
        with torch.no_grad():
            ones = torch.ones(len(t_rows), device=dev)
            x_t = transform(xb[t_rows.to(dev)], ones, index=index[idx][t_rows].to(dev))
    return xb, yb, x_t, t_rows.to(dev)


def _first_batch(x: Any, y: Tensor, batch_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, x[idx], y[idx]) of the first batch of epoch 0."""
    first = epoch_batches(len(x), batch_size, seed, 0)[0]
    return first, x[first], y[first]


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
    n_original: int | None = None,
    stage: str = "search",
    checkpoint_key: str = "search",
    amp: bool = False,
    on_step: Callable[[int, Mapping[str, Tensor]], None] | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Algorithm 1 lines 2-3: initialise the soft mask and minimise Eq. 9 (+ the optional anchor)
    over it for `epochs` epochs with the model frozen (eval mode, no weight gradients). Returns the
    scores m (detached, on the model's device; in [0, 1] when spec.project). Rows at positions
    >= n_original (default len(x)) are augmented rows that already are T(x, 1): they feed every
    term but L_ratio, whose x_T = T(x, 1, index) comes from the original rows only. `y` feeds the
    anchor and ratio_rows "correct". on_step(step, scores) runs after every step (curves);
    `report` (a dict) receives the lambdas used and, with spec.balance, the term gradient norms at
    init. Resumable per epoch through ctx (key `checkpoint_key`). CARCERT_TRAIN_FORM=channels_last
    runs the steps in channels_last (core.trainform)."""
    dev = model_device(model)
    scores = score_params(init_scores(model, spec, seed, prune_ratio), dev)
    opt = mask_optimizer(list(scores.values()), spec.mask_lr, spec.mask_optimizer)
    index = torch.arange(len(x)) if index is None else index
    n_orig = len(x) if n_original is None else int(n_original)
    done, in_epoch, t_ratio = [0], [0], (transform if spec.lambda_ratio > 0 else None)

    def batch(idx: Tensor, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        return search_rows(xb, yb, idx, index, n_orig, t_ratio, dev)

    def step(item: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        xb, yb, x_t, t_rows = batch(*item)
        xb, x_t = fmt(xb), (None if x_t is None else fmt(x_t))
        if refresh is not None and in_epoch[0] % spec.bn_every == 0:
            refresh(scores)  # at every epoch start too, so a resumed search is the same search
        in_epoch[0] += 1
        loss = car_step(
            net, scores, opt, xb, x_t, spec, prune_ratio=prune_ratio, scope=scope, amp=amp,
            y=yb, t_rows=t_rows, lambdas=lambdas,
        )  # fmt: skip
        done[0] += 1
        if on_step is not None:
            on_step(done[0], scores)
        return loss

    state, load_state = score_checkpoint(scores, opt)
    with frozen_eval(model):
        net, refresh = search_network(model, x, spec, prune_ratio=prune_ratio, scope=scope, seed=seed)
        lambdas = term_lambdas(spec)
        if spec.balance and len(x) > 0:
            if refresh is not None:
                refresh(scores)
            torch.manual_seed(seed)
            xb, yb, x_t, t_rows = batch(*_first_batch(x, y, batch_size, seed))
            parts = car_terms(
                net, scores, xb, x_t, spec, prune_ratio=prune_ratio, scope=scope, y=yb, t_rows=t_rows
            )
            norms = term_grad_norms(parts, scores)
            lambdas = balanced_lambdas(spec, norms)
            if report is not None:
                report["term_grad_norms"] = norms
        if report is not None:
            report["lambdas"] = {k: v for k, v in lambdas.items() if v > 0}
        with channels_last_steps(net, scores.values()) as fmt:  # core.trainform
            run_epochs(
                len(x), epochs=epochs, batch_size=batch_size, seed=seed, step=step, state=state,
                load_state=load_state, ctx=ctx, stage=stage, checkpoint_key=checkpoint_key,
                fetch=stream_batches(x, y, dev), on_epoch_end=lambda _: in_epoch.__setitem__(0, 0),
            )  # fmt: skip
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
        n_original=len(data.train_x),
        stage="search",
        checkpoint_key=f"{key}-search",
        amp=spec.amp,
    )
    hard = topk_mask(scores, spec.prune_ratio, spec.scope, tiebreak=prunable_weights(model))
    return prune_and_finetune(model, x, y, hard, spec, seed=seed, key=key, ctx=ctx)
