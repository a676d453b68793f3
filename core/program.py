"""A user's own network as a torch.export program (.pt2): load it safely, run it as a trainable
module, export the pruned result.

Contract:
- `read_program(path)` loads an ExportedProgram with torch.export.load while torch.load is forced
  to weights_only=True, after refusing archives with pickled payloads, custom / opaque objects or
  AOTInductor packages: nothing in the file is unpickled with code execution.
- `program_module(ep)` is `ep.module()` made trainable: every aten batch-norm node that reads its
  parameters from one module of the original network (nn.BatchNorm1d/2d/3d, the usual case) runs
  through a real nn.BatchNorm module holding the same tensors under the same state-dict names,
  and every aten dropout node through nn.Dropout, so `.train()` / `.eval()` switch them as in the
  original nn.Module, whichever mode the program was exported in (attention dropout too; any other
  random op, e.g. stochastic depth exported in train mode, is refused). Parameter and buffer names are
  the program's state-dict names; conv / linear weights are found from the graph
  (core.masking.prunable_weights), masks are keyed by those names.
- `check_classifier(model, x, num_classes)` runs the program on a batch of 1 and of 3 samples of the
  dataset and refuses (ProgramError, naming the reason) a wrong input shape, a static batch size,
  an output that is not one (N, K) logits tensor with K >= num_classes, or no conv/linear weight.
- `export_program(model, x, path)` re-exports the (pruned, fine-tuned) module in eval mode with a
  dynamic batch dimension and writes a .pt2 that `torch.export.load(path).module()` runs without
  carcert; returns its sha256.
"""

from __future__ import annotations

import copy
import json
import operator
import threading
import zipfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from core.errors import InvalidInput, ProgramError
from core.models import file_sha256, load_weights

ARCH = "program"  # the certificate's / metrics' "arch" of a user program
_LOAD_LOCK = threading.Lock()
_aten = torch.ops.aten
BATCH_NORMS = {
    _aten.batch_norm.default: "batch_norm",
    _aten._native_batch_norm_legit_no_training.default: "legit_no_training",
}
DROPOUTS = {
    _aten.dropout.default: nn.Dropout,
    _aten.dropout_.default: nn.Dropout,
    _aten.feature_dropout.default: nn.Dropout2d,
    _aten.feature_dropout_.default: nn.Dropout2d,
}
SDPA = _aten.scaled_dot_product_attention.default
_BN_LEAVES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _check_archive(p: Path, error: type[InvalidInput]) -> None:
    try:
        with zipfile.ZipFile(p) as z:
            for n in z.namelist():
                if "/aotinductor/" in n:
                    raise error(f"{p.name}: AOTInductor packages are not supported")
                if n.endswith((".pkl", "data/weights/model.pt", "data/constants/model.pt")):
                    raise error(f"{p.name}: pickled payload {n} refused")
                if n.endswith(("_weights_config.json", "_constants_config.json")):
                    cfg = json.loads(z.read(n)).get("config", {})
                    for key, meta in cfg.items():
                        path_name = str(meta.get("path_name", ""))
                        if meta.get("use_pickle") or path_name.startswith(("custom_obj", "opaque")):
                            raise error(f"{p.name}: pickled entry {key!r} refused")
    except zipfile.BadZipFile as exc:
        raise error(f"{p.name} is not a torch.export .pt2 archive (torch.export.save)") from exc


def read_program(path: str | Path, error: type[InvalidInput] = ProgramError) -> torch.export.ExportedProgram:
    """Load a torch.export .pt2 program without executing pickled code (module docstring); any
    failure raises `error` naming the file and the reason."""
    p = Path(path)
    if not p.is_file():
        raise error(f"program file not found: {p}")
    _check_archive(p, error)
    real_load = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    try:
        with _LOAD_LOCK, mock.patch.object(torch, "load", safe_load):
            program = torch.export.load(str(p))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"cannot load exported program {p.name}: {msg[:300]}") from None
    if not isinstance(program, torch.export.ExportedProgram):
        raise error(f"{p.name} does not hold a torch.export ExportedProgram")
    return program


def _attr_target(node: Any) -> str | None:
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _holder(gm: torch.fx.GraphModule, targets: list[str], leaves: set[str]) -> str | None:
    """The module path P when every target is P.<leaf> and P's own tensors / get_attr uses are all
    among `leaves` (so a module of that type can replace it, state-dict names unchanged)."""
    prefixes = {t.rpartition(".")[0] for t in targets}
    if len(prefixes) != 1 or any(t.rpartition(".")[2] not in leaves for t in targets):
        return None
    prefix = prefixes.pop()
    if not prefix:
        return None
    mod = gm.get_submodule(prefix)
    own = {n for n, _ in mod.named_parameters(recurse=False)}
    own |= {n for n, _ in mod.named_buffers(recurse=False)}
    if list(mod.children()) or not own <= leaves:
        return None
    for node in gm.graph.nodes:
        t = _attr_target(node)
        if t is not None and t.startswith(prefix + ".") and t.rpartition(".")[2] not in leaves:
            return None
    return prefix


def _bn_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, nn.Module] | None:
    """An nn.BatchNormNd equivalent to a batch-norm node, holding the node's tensors, or None."""
    if BATCH_NORMS[node.target] == "batch_norm":
        x, w, b, rm, rv, _training, momentum, eps = node.args[:8]
    else:
        x, w, b, rm, rv, momentum, eps = node.args[:7]
    names = [_attr_target(a) for a in (w, b, rm, rv)]
    if (w is None) != (b is None):
        return None
    if (
        names[2] is None
        or names[3] is None
        or (w is not None and names[0] is None)
        or (b is not None and names[1] is None)
    ):
        return None
    prefix = _holder(gm, [n for n in names if n is not None], _BN_LEAVES)
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if prefix is None or val is None or val.dim() not in (2, 3, 4, 5):
        return None
    holder = gm.get_submodule(prefix)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[val.dim()]
    bn = cls(holder.running_mean.shape[0], eps=float(eps), momentum=float(momentum), affine=w is not None)
    if w is not None:
        bn.weight, bn.bias = holder.weight, holder.bias
    bn.running_mean, bn.running_var = holder.running_mean, holder.running_var
    if isinstance(getattr(holder, "num_batches_tracked", None), Tensor):
        bn.num_batches_tracked = holder.num_batches_tracked
    else:  # not in the program's state dict: keep it out of ours
        bn.register_buffer("num_batches_tracked", bn.num_batches_tracked, persistent=False)
    return prefix, bn


def _replace_batch_norms(gm: torch.fx.GraphModule) -> list[str]:
    """Route every convertible batch-norm node through an nn.BatchNorm module (module docstring);
    returns the names of the nodes left as they are (their mode is fixed by the export)."""
    graph, left = gm.graph, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in BATCH_NORMS:
            continue
        if node.args[3] is None:  # no running statistics: batch statistics in both modes
            continue
        found = _bn_module(gm, node)
        users = list(node.users)
        tuple_out = BATCH_NORMS[node.target] != "batch_norm"
        if found is None or (
            tuple_out and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users)
        ):
            left.append(node.name)
            continue
        prefix, bn = found
        gm.set_submodule(prefix, bn)
        with graph.inserting_before(node):
            new = graph.call_module(prefix, (node.args[0],))
        new.meta = dict(node.meta)
        for u in users if tuple_out else [node]:
            if tuple_out and u.args[1] != 0:
                graph.erase_node(u)
                continue
            u.replace_all_uses_with(new)
            if u is not node:
                graph.erase_node(u)
        graph.erase_node(node)
    for node in list(graph.nodes):  # the exported train-mode counter update: BatchNorm does it now
        if (
            node.op == "call_function"
            and node.target is _aten.add_.Tensor
            and not node.users
            and (_attr_target(node.args[0]) or "").endswith(".num_batches_tracked")
            and isinstance(
                gm.get_submodule(node.args[0].target.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm
            )
        ):
            graph.erase_node(node)
    return left


def _replace_dropouts(gm: torch.fx.GraphModule) -> None:
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target not in DROPOUTS:
            continue
        name = f"carcert_dropout_{i}"
        gm.add_submodule(name, DROPOUTS[node.target](float(node.args[1])))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


class AttentionDropout(nn.Module):
    """aten.scaled_dot_product_attention with its dropout probability applied in train mode only
    (a train-mode export fixes dropout_p in the graph)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None, is_causal: bool = False, **kwargs: Any
    ) -> Tensor:
        return SDPA(q, k, v, attn_mask, self.p if self.training else 0.0, is_causal, **kwargs)


def _replace_attention_dropouts(gm: torch.fx.GraphModule) -> None:
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        args = list(node.args) + [None, 0.0, False][len(node.args) - 3 :]
        p = float(node.kwargs.get("dropout_p", args[4]))
        if p == 0.0:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dropout_p", "attn_mask", "is_causal")}
        name = f"carcert_attention_{i}"
        gm.add_submodule(name, AttentionDropout(p))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(
                name,
                (*args[:3], node.kwargs.get("attn_mask", args[3]), node.kwargs.get("is_causal", args[5])),
                kwargs,
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _refuse_random_ops(gm: torch.fx.GraphModule) -> None:
    """ProgramError for a random op left in the graph (e.g. stochastic depth exported in train mode):
    it would make evaluation and certification random."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded in target.tags and target is not SDPA:
            raise ProgramError(
                f"the program contains the random op {target} (node {node.name}), which carcert cannot "
                "switch off in eval mode (stochastic depth exported in train mode?); export after net.eval()"
            )


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


class ProgramModule(torch.fx.GraphModule):
    """`ep.module()` with BatchNorm / dropout as real modules (module docstring). `bn_fixed` names
    the batch-norm nodes whose mode the export fixed (they cannot be re-estimated)."""

    bn_fixed: tuple[str, ...] = ()

    def fold_batchnorm(self) -> nn.Module:
        """core.car.fold_batchnorm for programs: a frozen eval-mode copy in which every BatchNorm
        fed by a conv / linear node alone is folded into it (w * s, (b - mean) * s + beta), the
        weight keeping its name, so f(x; m * theta) is unchanged for every mask m."""
        return fold_program_batchnorm(self)


def require_trainable(model: nn.Module) -> None:
    """ProgramError when the program has batch-norm nodes whose running statistics cannot be run in
    train mode (their parameters do not belong to one BatchNorm module): pruning would fine-tune and
    re-estimate them silently wrong. Certification (eval mode) does not need this."""
    fixed = getattr(model, "bn_fixed", ())
    if fixed:
        raise ProgramError(
            f"the program's batch-norm node(s) {', '.join(fixed[:5])} cannot be switched to train mode "
            "(their weight and running statistics are not the tensors of one BatchNorm module), so their "
            "statistics cannot be re-estimated after pruning; use nn.BatchNorm1d/2d/3d and export again"
        )


def program_module(ep: torch.export.ExportedProgram) -> ProgramModule:
    """The trainable module of a program (module docstring), in eval mode."""
    gm = ep.module()
    for name in ("train", "eval"):  # ep.module() forbids them; BatchNorm / dropout now follow them
        gm.__dict__.pop(name, None)
    fixed = _replace_batch_norms(gm)
    _replace_dropouts(gm)
    _replace_attention_dropouts(gm)
    _refuse_random_ops(gm)
    _drop_unused_attrs(gm)
    gm.graph.lint()
    out = ProgramModule(gm, gm.graph, class_name="ProgramModule")
    out.bn_fixed = tuple(fixed)
    return out.eval()


def fold_program_batchnorm(model: torch.fx.GraphModule) -> nn.Module:
    from core.masking import CONV_OPS, LINEAR_OPS

    net = copy.deepcopy(model).eval()
    graph = net.graph
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                uses[a.target] = uses.get(a.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = net.get_submodule(node.target)
        src = node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(src, torch.fx.Node):
            continue
        if src.op != "call_function" or src.target not in (*CONV_OPS, *LINEAR_OPS) or len(src.users) != 1:
            continue
        if src.target is _aten.convolution.default and src.args[6]:
            continue  # transposed: the weight's output channels are not its first dimension
        w_name, b_node = _attr_target(src.args[1]), src.args[2] if len(src.args) > 2 else None
        if (
            w_name is None
            or uses.get(w_name) != 1
            or (b_node is not None and (_attr_target(b_node) is None or uses.get(b_node.target) != 1))
        ):
            continue
        with torch.no_grad():
            s = (
                bn.weight / torch.sqrt(bn.running_var + bn.eps)
                if bn.affine
                else torch.rsqrt(bn.running_var + bn.eps)
            )
            shift = bn.bias if bn.affine else torch.zeros_like(s)
            w = net.get_parameter(w_name)
            w.copy_(w * s.reshape(-1, *([1] * (w.dim() - 1))))
            if b_node is not None:
                b = net.get_parameter(b_node.target)
                b.copy_((b - bn.running_mean) * s + shift)
            else:
                holder, _, leaf = w_name.rpartition(".")
                bias_name = f"carcert_folded_bias_{node.name}"
                net.get_submodule(holder).register_parameter(
                    bias_name, nn.Parameter(-bn.running_mean * s + shift)
                )
                with graph.inserting_before(src):
                    b_node = graph.get_attr(f"{holder}.{bias_name}" if holder else bias_name)
                args = list(src.args) + [None] * max(0, 3 - len(src.args))
                args[2] = b_node
                src.args = tuple(args)
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        net.delete_submodule(node.target)
    graph.lint()
    net.recompile()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def check_classifier(model: nn.Module, x: Tensor, num_classes: int) -> int:
    """Run `model` (eval mode, no gradients) on 1 and on 3 samples of `x`; returns the number of
    logits K. ProgramError (naming the reason) when it has no conv / linear weight, rejects the
    dataset's input shape (C, H, W) or a batch size, or does not return one (N, K) float tensor with
    K >= num_classes."""
    from core.masking import prunable_weights

    if not prunable_weights(model):
        raise ProgramError(
            "the program has no conv or linear weight to prune (looked for parameters "
            "used as the weight of aten conv1d/conv2d/conv3d/convolution/linear)"
        )
    shape = tuple(x.shape[1:])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = []
            for n in (1, 3):
                try:
                    outs.append(model(x[:n]))
                except Exception as exc:  # noqa: BLE001 - guard failures, shape errors: the user's program
                    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    hint = (
                        " (export it with a dynamic batch dimension: dynamic_shapes={'x': {0: "
                        "torch.export.Dim('batch')}})"
                        if n == 1 or "size()[0]" in msg
                        else ""
                    )
                    raise ProgramError(
                        f"the program does not accept a batch of {n} dataset input(s) of "
                        f"shape {shape}: {msg}{hint}"
                    ) from None
    finally:
        model.train(was)
    for n, out in zip((1, 3), outs, strict=True):
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n or not out.is_floating_point():
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ProgramError(
                f"the program's output must be one (N, classes) logits tensor, got {got} for a batch of {n}"
            )
    k = int(outs[0].shape[1])
    if k < num_classes:
        raise ProgramError(f"the program returns {k} logits but the dataset has {num_classes} classes")
    return k


def load_program_model(path: str | Path, weights: str | Path | None = None) -> ProgramModule:
    """read_program + program_module, then the safetensors / weights_only checkpoint `weights`
    (keys, shapes and finiteness checked against the program's state dict) when given."""

    model = program_module(read_program(path))
    if weights is not None:
        load_weights(model, weights)
    return model


def export_program(model: nn.Module, x: Tensor, path: str | Path) -> str:
    """Export `model` in eval mode (on the CPU, example batch x[:2], batch dimension dynamic) to
    `path` (written atomically) and return the file's sha256. A model that normalises its input
    (core.preprocess) is exported as Preprocessed(net, normalize): it takes raw [0, 1] images."""
    from torch.export import Dim

    from core.preprocess import exportable

    path = Path(path)
    net = exportable(model).cpu().eval()  # with its input normalisation baked in (core.preprocess)
    for p in net.parameters():
        p.requires_grad_(False)
    example = x[:2].detach().cpu().to(torch.float32)
    try:
        ep = torch.export.export(net, (example,), dynamic_shapes=({0: Dim.AUTO},))
    except Exception as exc:  # noqa: BLE001 - reported as a job failure with the reason
        raise ProgramError(f"cannot export the pruned program: {str(exc).splitlines()[0][:300]}") from None
    tmp = path.with_name(f".tmp-{path.name}")
    torch.export.save(ep, str(tmp))
    tmp.replace(path)
    return file_sha256(path)


def describe_program(ep: torch.export.ExportedProgram) -> dict[str, Any]:
    """What can be checked from the program alone (the upload check): one image-batch input
    (N, C, H, W) with a dynamic batch dimension, one (N, K) output, at least one conv / linear
    weight. Returns {"input_shape": [C, H, W] (None for a dynamic size), "classes": K or None,
    "prunable": [names]}; ProgramError naming the first violation."""
    from core.masking import graph_prunable_weights

    sig = ep.graph_signature
    inputs = {n.name: n for n in ep.graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs}
    if len(sig.user_inputs) != 1 or len(inputs) != 1:
        raise ProgramError(f"the program must take one image batch, it takes {len(sig.user_inputs)} inputs")
    val = next(iter(inputs.values())).meta.get("val")
    if not isinstance(val, Tensor) or val.dim() != 4:
        shape = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
        raise ProgramError(f"the program's input must be an image batch (N, C, H, W), got {shape}")
    if isinstance(val.shape[0], int):
        raise ProgramError(
            f"the program's batch dimension is static ({val.shape[0]}); export it with a dynamic one: "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}"
        )
    outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    user_outs = outs[len(outs) - len(sig.user_outputs) :]
    vals = [o.meta.get("val") if isinstance(o, torch.fx.Node) else o for o in user_outs]
    if len(vals) != 1 or not isinstance(vals[0], Tensor) or vals[0].dim() != 2:
        got = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in vals]
        raise ProgramError(f"the program must return one (N, classes) logits tensor, it returns {got}")
    prunable = list(graph_prunable_weights(ep.module()))
    if not prunable:
        raise ProgramError("the program has no conv or linear weight to prune")
    k = vals[0].shape[1]
    return {
        "input_shape": [int(d) if isinstance(d, int) else None for d in val.shape[1:]],
        "classes": int(k) if isinstance(k, int) else None,
        "prunable": prunable,
    }
