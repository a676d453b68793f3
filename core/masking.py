"""Masks on the prunable weights (every nn.Conv2d / nn.Linear weight, or aten conv / linear weight of a
torch.export program): init, binarize, export.

Conventions (METHOD.md, "CAR" and the paper's Sec. 2.1):
- a mask is a dict {parameter name: tensor of the weight's shape}; soft masks are float in [0, 1],
  hard masks are bool (True = kept);
- the compressed model is f(x; m * theta) (functional, `masked_forward`) or, once binarized,
  theta <- theta * m in place (`apply_masks_`);
- prune ratio pr = 1 - ||m||_0 / |theta| counts prunable weights only (biases and BatchNorm
  parameters are never pruned).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call

from core.errors import InvalidInput, WeightsError

Scope = str  # "layer" | "global"
_SCOPES = ("layer", "global")


_aten = torch.ops.aten
CONV_OPS = (
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.convolution.default,
    _aten.conv1d.padding,
    _aten.conv2d.padding,
    _aten.conv3d.padding,
)
LINEAR_OPS = (_aten.linear.default,)


def graph_prunable_weights(gm: torch.fx.GraphModule) -> dict[str, nn.Parameter]:
    """In a torch.fx graph of aten ops (a torch.export program's module, core.program): every
    parameter read by a get_attr node and used as the weight argument of an aten conv (any
    groups, so grouped and depthwise convs too; not transposed) or linear node, in graph order,
    keyed by its state-dict name."""
    out: dict[str, nn.Parameter] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (*CONV_OPS, *LINEAR_OPS) or len(node.args) < 2:
            continue
        w = node.args[1]
        if node.target is _aten.convolution.default and node.args[6]:
            continue  # transposed convolution
        if isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target not in out:
            try:
                p = gm.get_parameter(w.target)
            except AttributeError:
                continue  # a buffer or constant, not a trained weight
            out[w.target] = p
    return out


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every nn.Conv2d / nn.Linear, keyed by its parameter name (as in state_dict);
    for a torch.fx GraphModule also the conv / linear weights its graph uses
    (`graph_prunable_weights`)."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and isinstance(mod.weight, nn.Parameter):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    if isinstance(model, torch.fx.GraphModule):
        for name, p in graph_prunable_weights(model).items():
            out.setdefault(name, p)
    return out


def masked_forward(model: nn.Module, x: Tensor, masks: Mapping[str, Tensor]) -> Tensor:
    """f(x; theta * m) without touching the model: torch.func.functional_call with w * m for every
    masked weight (the other parameters and buffers are the model's own)."""
    weights = prunable_weights(model)
    unknown = set(masks) - set(weights)
    if unknown:
        raise InvalidInput(f"masks for unknown layers: {sorted(unknown)[:5]}")
    params = {name: weights[name] * m.to(dtype=weights[name].dtype) for name, m in masks.items()}
    return functional_call(model, params, (x,))


def _count_kept(n: int, prune_ratio: float) -> int:
    """Exact kept count: round((1 - pr) * n) (METHOD.md step 4)."""
    return int(round((1.0 - prune_ratio) * n))


def partial_scaled_init(weights: Mapping[str, Tensor], tau: float) -> dict[str, Tensor]:
    """Algorithm 1, line 2: m_i = |theta_i| / Q(|theta_i|, tau), clipped to [0, 1].

    Q is the k-th largest |theta| of the layer with k = max(1, round(tau * n)), so exactly the
    top-tau fraction of the layer starts at 1 (ties with the k-th value aside) and the rest keep
    proportional values in [0, 1). tau = 0 gives HYDRA's full-scaled init m = |theta| / max|theta|.
    The magnitude is used (a mask lives in [0, 1]); the sign stays in theta.
    """
    if not 0.0 <= tau <= 1.0:
        raise InvalidInput(f"tau must be in [0, 1], got {tau}")
    out = {}
    for name, w in weights.items():
        a = w.detach().abs().flatten().float()
        k = max(1, int(round(tau * a.numel())))
        q = torch.topk(a, k, largest=True, sorted=False).values.min()
        m = torch.where(a >= q, torch.ones_like(a), a / q.clamp_min(torch.finfo(a.dtype).tiny))
        out[name] = m.clamp_(0.0, 1.0).view_as(w).contiguous()
    return out


def random_init(weights: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """The ablation's random init (paper Table 4): m ~ U[0, 1] independently per entry."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=g).to(w.device) for name, w in weights.items()}


def _keep_top(a: Tensor, k: int, tb: Tensor | None) -> Tensor:
    """Bool mask of the k largest entries of the 1-D tensor a; entries tied with the k-th value
    are chosen by the largest tb (when given), else by torch.topk's order."""
    keep = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    if k <= 0:
        return keep
    if k >= a.numel():
        return keep.fill_(True)
    top = torch.topk(a, k, sorted=False)
    if tb is None:
        keep[top.indices] = True
        return keep
    thr = top.values.min()
    keep = a > thr
    need = k - int(keep.sum())
    tied = (a == thr).nonzero().flatten()
    keep[tied[torch.topk(tb[tied], need, sorted=False).indices]] = True
    return keep


def topk_mask(
    scores: Mapping[str, Tensor],
    prune_ratio: float,
    scope: Scope = "layer",
    tiebreak: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Algorithm 1, line 4: keep the largest |score| entries, exactly round((1 - pr) * n) of them
    per layer (scope "layer", n = layer size) or over all layers together (scope "global",
    n = total size). Entries tied at the threshold are kept by the largest |tiebreak| when
    given (e.g. the weights, so that a mask driven to 0 falls back to magnitude pruning), else
    in torch.topk's (deterministic) order."""
    if not 0.0 <= prune_ratio < 1.0:
        raise InvalidInput(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if scope not in _SCOPES:
        raise InvalidInput(f"scope must be one of {_SCOPES}, got {scope!r}")

    def tb(name: str, dev: torch.device) -> Tensor | None:
        return None if tiebreak is None else tiebreak[name].detach().abs().flatten().to(dev)

    out: dict[str, Tensor] = {}
    if scope == "layer":
        for name, s in scores.items():
            flat = s.detach().abs().flatten()
            out[name] = _keep_top(flat, _count_kept(flat.numel(), prune_ratio), tb(name, flat.device)).view(
                s.shape
            )
        return out
    names = list(scores)
    flats = [scores[n].detach().abs().flatten() for n in names]
    allv = torch.cat(flats) if flats else torch.empty(0)
    all_tb = None if tiebreak is None else torch.cat([tb(n, allv.device) for n in names])
    keep = _keep_top(allv, _count_kept(allv.numel(), prune_ratio), all_tb)
    start = 0
    for name, f in zip(names, flats, strict=True):
        out[name] = keep[start : start + f.numel()].view(scores[name].shape)
        start += f.numel()
    return out


def straight_through_mask(
    scores: Mapping[str, Tensor], prune_ratio: float, scope: Scope = "layer"
) -> dict[str, Tensor]:
    """Hard top-k mask with a straight-through estimator (Eq. 8, Bengio et al. 2013):
    forward value = topk_mask(scores) as 0/1 floats (exactly), backward = identity, so
    d loss / d scores = d loss / d hard mask."""
    hard = topk_mask(scores, prune_ratio, scope)
    return {n: hard[n].to(s.dtype) + (s - s.detach()) for n, s in scores.items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """theta <- theta * m in place for every masked weight."""
    weights = prunable_weights(model)
    for name, m in masks.items():
        if name not in weights:
            raise InvalidInput(f"mask for unknown layer {name!r}")
        w = weights[name]
        if tuple(m.shape) != tuple(w.shape):
            raise InvalidInput(f"mask {name!r} has shape {tuple(m.shape)}, weight {tuple(w.shape)}")
        w.mul_(m.to(device=w.device, dtype=w.dtype))


def masks_sha256(masks: Mapping[str, Tensor]) -> str:
    """Content hash of bool masks: sha256 over (name, shape, packed bytes) in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(m.shape)).encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


def _layer_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    return {n: 1.0 - float(m.count_nonzero()) / max(1, m.numel()) for n, m in masks.items()}


def save_masks(path: str | Path, masks: Mapping[str, Tensor], metadata: dict | None = None) -> str:
    """Write bool masks as safetensors. Metadata (all strings) carries "layer_sparsity" (JSON
    {name: sparsity}), "sparsity" (over all masked weights) and "content_sha256"
    (`masks_sha256`, checked by `load_masks`), plus the caller's `metadata` (values str()-ed).
    Returns the sha256 of the written file (the certificate's mask_sha256)."""
    path = Path(path)
    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}
    total = sum(m.numel() for m in tensors.values())
    kept = sum(int(m.count_nonzero()) for m in tensors.values())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(
        {
            "format": "carcert-masks/1",
            "layer_sparsity": json.dumps(_layer_sparsity(tensors), sort_keys=True),
            "sparsity": repr(1.0 - kept / max(1, total)),
            "content_sha256": masks_sha256(tensors),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """Read masks written by `save_masks` (or any safetensors of 0/1 tensors) as bool tensors.
    A corrupt file, non-0/1 values or a content hash mismatch -> core.errors.WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"mask file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read mask file {path}: {e}") from e
    out = {}
    for name, t in tensors.items():
        if t.dtype != torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise WeightsError(f"mask {name!r} in {path} has values other than 0 and 1")
            t = t != 0
        out[name] = t
    want = meta.get("content_sha256")
    if want is not None and want != masks_sha256(out):
        raise WeightsError(f"mask file {path} does not match its recorded content sha256")
    return out


@torch.no_grad()
def sparsity_report(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> dict:
    """Over the prunable weights: {"params": total, "nonzero": count of nonzero (w * m),
    "sparsity": 1 - nonzero / params, "layers": [{"name", "params", "nonzero", "sparsity"}]}."""
    layers = []
    total = nonzero = 0
    for name, w in prunable_weights(model).items():
        nz = w != 0
        if masks is not None and name in masks:
            nz = nz & masks[name].to(device=w.device, dtype=torch.bool)
        n, k = w.numel(), int(nz.count_nonzero())
        total += n
        nonzero += k
        layers.append({"name": name, "params": n, "nonzero": k, "sparsity": 1.0 - k / max(1, n)})
    return {
        "params": total,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / max(1, total),
        "layers": layers,
    }
