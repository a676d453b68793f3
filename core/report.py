"""Job report: matplotlib figures (Agg, no pyplot state) rendered to HTML / PNG / PDF.

Pure: takes plain data, returns strings / bytes; no HTTP, SQL or Celery.

Input `results` is a list of dicts, one per variant (a method x prune ratio of a job):
    {"name", "method", "prune_ratio", "accuracy", "pca", "certificate" (DESIGN.md JSON or None),
     "metrics" (the variant's metrics.json or None)}
and `examples` (optional) the images x (N, C, H, W) in [0, 1] with their transformed versions
T(x, delta) for a few deltas and, when known, each image's certificate sample (label, prediction,
certified) (ExampleImages).

Figures (FIGURES, keyed by name):
    accuracy_pca  accuracy and PCA (Eq. 10: certified / samples) vs prune ratio, one line per method;
                  when no method has two prune ratios (e.g. a single job), bars per variant instead
    pareto        PCA vs sparsity across the variants of a sweep, one line per method, the unpruned
                  model (vanilla / prune ratio 0) as a reference line; only with two variants or
                  more (a single job has no trade-off to show)
    pca_epsilon   certified accuracy vs epsilon (log axis) from the per-sample bounds: the share of
                  samples that are correct with eps_hat <= epsilon, one line per variant, the job's
                  epsilon marked (its value there is the certificate's PCA)
    sparsity      per-layer sparsity bars, one group per layer, one bar per variant
    epsilon       histogram of log10 of the per-sample bounds eps_hat (METHOD.md, CC-Cert), with the
                  certification threshold epsilon as a vertical line, one panel per variant
    margins       per-sample margin d = (p1 - p2) / 2 vs max_i Z_i, with the line Z = d (label
                  invariance holds below it, Appendix A.2), one panel per variant
    examples      x and T(x, delta) for each delta; with the samples known, each row names the
                  label, the prediction and whether the sample is certified (check / cross)
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.bounds import DEFAULT_BETA, clopper_pearson_upper  # noqa: E402

FIGURES = ("accuracy_pca", "pareto", "pca_epsilon", "sparsity", "epsilon", "margins", "examples")
TITLES = {
    "accuracy_pca": "Accuracy and PCA vs prune ratio",
    "pareto": "PCA vs sparsity (Pareto)",
    "pca_epsilon": "Certified accuracy vs epsilon",
    "sparsity": "Per-layer sparsity",
    "epsilon": "Per-sample bounds eps_hat",
    "margins": "Margin d vs max Z",
    "examples": "Examples x and T(x, delta)",
}
EPS_FLOOR = 1e-16  # bounds below this are drawn at log10(EPS_FLOOR) (a bound of exactly 0 is possible)
MAX_PANEL_COLS = 3


@dataclass(frozen=True)
class ExampleImages:
    """x: (N, C, H, W) in [0, 1]; transformed[k] = T(x, deltas[k]) with the same shape; samples
    (optional): row i's certificate sample ({"index", "label", "pred", "certified", ...})."""

    x: np.ndarray
    deltas: Sequence[float]
    transformed: Sequence[np.ndarray]
    samples: Sequence[Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if len(self.deltas) != len(self.transformed):
            raise ValueError("one transformed array per delta")
        for t in self.transformed:
            if np.shape(t) != np.shape(self.x):
                raise ValueError(f"transformed shape {np.shape(t)} != x shape {np.shape(self.x)}")
        if np.ndim(self.x) != 4:
            raise ValueError("x must be (N, C, H, W)")
        if self.samples is not None and len(self.samples) != np.shape(self.x)[0]:
            raise ValueError("one certificate sample per example image")


Examples = ExampleImages | tuple | None
"""ExampleImages, or a tuple (x, deltas, [T(x, d) for d in deltas]), or (x, [T(x, d) ...]) (deltas
then shown as their position k / K), or None."""


def as_examples(examples: Examples) -> ExampleImages | None:
    """Normalise the accepted forms of `examples` (see Examples)."""
    if examples is None or isinstance(examples, ExampleImages):
        return examples
    if len(examples) == 3:
        x, deltas, transformed = examples
    elif len(examples) == 2:
        x, transformed = examples
        deltas = [(k + 1) / len(transformed) for k in range(len(transformed))]
    else:
        raise ValueError("examples must be ExampleImages, (x, deltas, transformed) or (x, transformed)")
    return ExampleImages(
        x=np.asarray(x), deltas=[float(d) for d in deltas], transformed=[np.asarray(t) for t in transformed]
    )


def make_examples(
    x: Any,
    transform: Any,
    deltas: Sequence[float],
    index: Any = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
) -> ExampleImages:
    """ExampleImages from a tensor x (N, C, H, W) in [0, 1] and a core.transforms
    SemanticTransform: transformed[k] = T(x, deltas[k], index) (index: dataset indices, needed by
    precomputed variants); samples: the images' certificate samples, shown beside them."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        out = [transform(x, torch.full((x.shape[0],), float(d)), index).cpu().numpy() for d in deltas]
    return ExampleImages(
        x=x.cpu().numpy(),
        deltas=[float(d) for d in deltas],
        transformed=out,
        samples=None if samples is None else [dict(s) for s in samples],
    )


EXAMPLE_DELTAS = (0.25, 0.5, 0.75, 1.0)
EXAMPLE_COUNT = 4
THUMBNAIL_SIDE = 96  # examples.npz keeps images at most this many pixels a side (uint8)


def example_samples(samples: Sequence[Mapping[str, Any]], count: int = EXAMPLE_COUNT) -> list[dict]:
    """The certificate samples a report shows as examples: certified ones first, then the rest."""
    ordered = [s for s in samples if s.get("certified")] + [s for s in samples if not s.get("certified")]
    return [dict(s) for s in ordered[:count]]


def _thumbnail(images: np.ndarray, side: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8, scaled down (antialiased) so that max(H, W) <= side."""
    import torch

    t = torch.as_tensor(images, dtype=torch.float32)
    h, w = t.shape[-2:]
    if max(h, w) > side:
        size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True)
    return np.round(t.clamp(0.0, 1.0).numpy() * 255.0).astype(np.uint8)


def save_examples(path: Any, examples: ExampleImages, side: int = THUMBNAIL_SIDE) -> None:
    """examples.npz beside a certificate: x and T(x, delta) as uint8 thumbnails (max side `side`),
    the deltas and the test indices of examples.samples (the certificate holds the rest)."""
    if examples.samples is None:
        raise ValueError("save_examples needs the examples' certificate samples")
    np.savez_compressed(
        path,
        x=_thumbnail(examples.x, side),
        transformed=np.stack([_thumbnail(t, side) for t in examples.transformed]),
        deltas=np.asarray(examples.deltas, dtype=np.float64),
        indices=np.asarray([int(s["index"]) for s in examples.samples], dtype=np.int64),
    )


def load_examples(path: Any, samples: Sequence[Mapping[str, Any]]) -> ExampleImages:
    """ExampleImages from save_examples' file; each image's sample found by index in `samples` (the
    certificate's). Never unpickles (allow_pickle=False)."""
    by_index = {int(s["index"]): dict(s) for s in samples}
    with np.load(path, allow_pickle=False) as data:
        x = data["x"].astype(np.float32) / 255.0
        transformed = [t.astype(np.float32) / 255.0 for t in data["transformed"]]
        deltas = [float(d) for d in data["deltas"]]
        chosen = [by_index[int(i)] for i in data["indices"]]
    return ExampleImages(x=x, deltas=deltas, transformed=transformed, samples=chosen)


# ----------------------------------------------------------------------------- data extraction


def _samples(result: Mapping[str, Any]) -> list[dict]:
    cert = result.get("certificate") or {}
    return list(cert.get("samples") or [])


def layer_sparsity(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(layer name, sparsity) from the certificate's model.layers, else from metrics.layers."""
    cert = result.get("certificate") or {}
    layers = (cert.get("model") or {}).get("layers") or (result.get("metrics") or {}).get("layers") or []
    return [(str(entry["name"]), float(entry["sparsity"])) for entry in layers]


def epsilon_log_bounds(result: Mapping[str, Any]) -> np.ndarray:
    """log10(max(eps_hat, EPS_FLOOR)) of every sample of the result's certificate."""
    eps = np.array([float(s["epsilon_bound"]) for s in _samples(result)], dtype=np.float64)
    return np.log10(np.maximum(eps, EPS_FLOOR))


def _threshold(result: Mapping[str, Any]) -> float | None:
    params = (result.get("certificate") or {}).get("params") or {}
    eps = params.get("epsilon")
    return float(eps) if eps is not None else None


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _methods(results: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in results:
        if str(r["method"]) not in out:
            out.append(str(r["method"]))
    return out


# ----------------------------------------------------------------------------- figures


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(MAX_PANEL_COLS, n))
    return math.ceil(n / cols), cols


def figure_accuracy_pca(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Two panels (titles 'Accuracy', 'PCA'); one line per method (label = method), points sorted
    by prune ratio. When no method has two prune ratios: figure_variant_bars instead (a line of
    one point would be a lone dot on an empty axis)."""
    counts = [sum(str(r["method"]) == m for r in results) for m in _methods(results)]
    if results and max(counts) < 2:
        return figure_variant_bars(results)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_pca = fig.subplots(1, 2)
    for method in _methods(results):
        rows = sorted((r for r in results if str(r["method"]) == method), key=lambda r: r["prune_ratio"])
        ratios = [float(r["prune_ratio"]) for r in rows]
        ax_acc.plot(ratios, [_float_or_nan(r.get("accuracy")) for r in rows], marker="o", label=method)
        ax_pca.plot(ratios, [_float_or_nan(r.get("pca")) for r in rows], marker="o", label=method)
    for ax, title in ((ax_acc, "Accuracy"), (ax_pca, "PCA")):
        ax.set_title(title)
        ax.set_xlabel("prune ratio")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if results:
            ax.legend(fontsize="small")
    return fig


def unpruned_reference(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The unpruned model of a sweep: the first variant of method vanilla or prune ratio 0."""
    return next(
        (r for r in results if str(r["method"]) == "vanilla" or float(r["prune_ratio"]) == 0.0), None
    )


def figure_pareto(results: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel: x = sparsity (fraction of zero weights: the certificate's, else metrics', else
    the prune ratio), y = PCA. Each method's pruned variants as a line sorted by sparsity (label =
    method); the unpruned reference (unpruned_reference) as a horizontal dashed line at its PCA
    (label 'unpruned (<name>): PCA <v>') and a star at its sparsity. Without one, a note says so."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ref = unpruned_reference(results)
    rows = {row["name"]: row for row in summary_rows(results)}

    def point(r: Mapping[str, Any]) -> tuple[float, float]:
        sparsity = rows[str(r["name"])]["sparsity"]
        x = float(r["prune_ratio"]) if sparsity is None else float(sparsity)
        return x, _float_or_nan(r.get("pca"))

    for method in _methods(results):
        pts = sorted(point(r) for r in results if str(r["method"]) == method and r is not ref)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if ref is not None:
        x, y = point(ref)
        label = f"unpruned ({ref['name']}): PCA {y:.3f}"
        ax.axhline(y, color="black", linestyle="--", linewidth=1, label=label)
        ax.plot([x], [y], marker="*", markersize=12, color="black", linestyle="none")
    else:
        ax.text(0.02, 0.04, "no unpruned variant in this job (add method vanilla for a reference)",
                transform=ax.transAxes, fontsize="small")  # fmt: skip
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sparsity (fraction of zero weights)")
    ax.set_ylabel("PCA")
    ax.set_title("PCA vs sparsity: upper right is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    return fig


def figure_variant_bars(results: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel: per variant (x tick = name) a bar of its accuracy (container label 'accuracy')
    and of its PCA ('PCA'), each value written above its bar."""
    fig = Figure(figsize=(max(5.0, 1.6 * len(results) + 2), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(results))
    for k, (key, label) in enumerate((("accuracy", "accuracy"), ("pca", "PCA"))):
        values = [_float_or_nan(r.get(key)) for r in results]
        bars = ax.bar(x + (k - 0.5) * 0.38, values, width=0.38, label=label)
        ax.bar_label(bars, labels=[_fmt(v if v == v else None, 3) for v in values], fontsize="small")
    ax.set_xticks(x, [str(r["name"]) for r in results])
    ax.set_ylim(0, 1.1)
    ax.set_title("Accuracy and PCA per variant")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="lower right")
    return fig


def certified_accuracy_curve(result: Mapping[str, Any], epsilons: np.ndarray) -> np.ndarray:
    """For each epsilon e: the share of the certificate's samples with pred == label and
    epsilon_bound <= e (a sample stopped early has bound 1, so it counts only at e >= 1)."""
    samples = _samples(result)
    if not samples:
        return np.full(len(epsilons), np.nan)
    bounds = np.array(
        [
            float(s["epsilon_bound"]) if s["pred"] == s["label"] and s.get("epsilon_bound") is not None
            else np.inf
            for s in samples
        ]
    )  # fmt: skip
    return (bounds[None, :] <= np.asarray(epsilons, dtype=np.float64)[:, None]).mean(axis=1)


def figure_pca_epsilon(results: Sequence[Mapping[str, Any]], points: int = 200) -> Figure:
    """One panel: certified_accuracy_curve of every result with samples (label = name) on a log
    epsilon axis from min(1e-8, job epsilons / 100) to 1 (smaller bounds count from the left edge
    on), and a vertical line at each job epsilon (label 'epsilon = <value>')."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    with_samples = [r for r in results if _samples(r)]
    thresholds = sorted({t for r in with_samples if (t := _threshold(r)) is not None})
    lo = min([1e-8, *(t / 100 for t in thresholds if t > 0)])
    grid = np.logspace(math.log10(lo), 0.0, points)
    for r in with_samples:
        ax.step(grid, certified_accuracy_curve(r, grid), where="post", label=str(r["name"]))
    for t in thresholds:
        ax.axvline(t, color="tab:red", linestyle="--", linewidth=1, label=f"epsilon = {t:g}")
    if not with_samples:
        ax.text(0.5, 0.5, "no certified samples", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epsilon (allowed probability that a random transformation changes the prediction)")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3, which="both")
    if with_samples:
        ax.legend(fontsize="small")
    return fig


def figure_sparsity(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Grouped bars: x = layers (union, in first-seen order), one bar container per result
    (label = result name) of height = that layer's sparsity (NaN-free: missing layers are 0 height
    and not drawn)."""
    layers: list[str] = []
    per_result = []
    for r in results:
        table = dict(layer_sparsity(r))
        per_result.append((str(r["name"]), table))
        for name in table:
            if name not in layers:
                layers.append(name)
    width_in = max(6.0, 0.5 * len(layers) * max(1, len(results)) ** 0.5 + 3)
    fig = Figure(figsize=(width_in, 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(per_result))
    for k, (name, table) in enumerate(per_result):
        idx = [i for i, layer in enumerate(layers) if layer in table]
        ax.bar(
            [i + (k - (len(per_result) - 1) / 2) * width for i in idx],
            [table[layers[i]] for i in idx],
            width=width,
            label=name,
        )
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize="x-small")
    ax.set_ylabel("sparsity (fraction of zero weights)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Per-layer sparsity")
    if per_result:
        ax.legend(fontsize="small")
    return fig


def _result_panels(results: Sequence[Mapping[str, Any]], panel_height: float) -> tuple[Figure, list]:
    """A figure with one 4 x panel_height panel per result that has certificate samples (_grid
    layout) and its (axes, result) pairs; the spare panels are turned off, and when no result has
    samples they say so."""
    with_samples = [r for r in results if _samples(r)]
    rows, cols = _grid(len(with_samples) or 1)
    fig = Figure(figsize=(4 * cols, panel_height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(with_samples) :]:
        ax.set_axis_off()
        if not with_samples:
            ax.text(0.5, 0.5, "no certified samples", ha="center", va="center")
    return fig, list(zip(axes, with_samples, strict=False))


def figure_epsilon(results: Sequence[Mapping[str, Any]], bins: int = 30) -> Figure:
    """One panel per result (title = name): histogram of epsilon_log_bounds with `bins` equal bins
    spanning the min..max over all results (shared edges), plus a vertical line at log10(epsilon)."""
    fig, panels = _result_panels(results, 3.2)
    all_logs = [epsilon_log_bounds(r) for _, r in panels]
    if panels:
        lo = min(float(v.min()) for v in all_logs)
        hi = max(float(v.max()) for v in all_logs)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
    for (ax, r), logs in zip(panels, all_logs, strict=True):
        ax.hist(logs, bins=edges, color="tab:blue", alpha=0.8)
        threshold = _threshold(r)
        if threshold is not None:
            ax.axvline(math.log10(threshold), color="tab:red", linestyle="--", label="log10 epsilon")
            ax.legend(fontsize="x-small")
        ax.set_title(str(r["name"]))
        ax.set_xlabel(f"log10 eps_hat (eps_hat = 0 drawn at {math.log10(EPS_FLOOR):.0f})")
        ax.set_ylabel("samples")
    return fig


def figure_margins(results: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per result (title = name): scatter of (d, max_z) per sample, certified samples
    (collection label 'certified') and the others ('not certified') separately, plus the line Z = d
    (label 'Z = d')."""
    fig, panels = _result_panels(results, 3.6)
    for ax, r in panels:
        samples = _samples(r)
        d = np.array([float(s["d"]) for s in samples])
        z = np.array([_float_or_nan(s["max_z"]) for s in samples])  # None: stopped before any draw
        ok = np.array([bool(s["certified"]) for s in samples])
        ax.scatter(d[ok], z[ok], s=12, color="tab:green", label="certified")
        ax.scatter(d[~ok], z[~ok], s=12, color="tab:red", marker="x", label="not certified")
        top = max(float(d.max()), float(np.nanmax(z, initial=0.0)), 1e-3) * 1.05
        ax.plot([0.0, top], [0.0, top], color="black", linewidth=1, linestyle="--", label="Z = d")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(str(r["name"]))
        ax.set_xlabel("margin d")
        ax.set_ylabel("max Z")
        ax.legend(fontsize="x-small")
    return fig


def _to_image(chw: np.ndarray) -> tuple[np.ndarray, dict]:
    arr = np.clip(np.asarray(chw, dtype=np.float32), 0.0, 1.0)
    if arr.shape[0] == 1:
        return arr[0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    if arr.shape[0] == 3:
        return np.transpose(arr, (1, 2, 0)), {}
    return arr.mean(axis=0), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}  # other channel counts: mean


CHECK, CROSS = "\u2713", "\u2717"


def example_caption(sample: Mapping[str, Any]) -> str:
    """'label 3, pred 3' and a check 'certified' or a cross 'not certified' on a second line."""
    mark = f"{CHECK} certified" if sample.get("certified") else f"{CROSS} not certified"
    return f"label {sample.get('label')}, pred {sample.get('pred')}\n{mark}"


def figure_examples(examples: ExampleImages, max_rows: int = 4) -> Figure:
    """Grid: row i = sample i (at most max_rows); column 0 = x (title 'x'), column k + 1 =
    T(x, deltas[k]) (title 'delta=<value>'). 1-channel images in gray with vmin 0 / vmax 1,
    3-channel as RGB (H, W, 3). With examples.samples, column 0's y label is example_caption
    (green when certified, red otherwise)."""
    n = min(max_rows, int(np.shape(examples.x)[0]))
    cols = 1 + len(examples.deltas)
    fig = Figure(figsize=(1.6 * cols, 1.7 * max(n, 1)), layout="constrained")
    axes = fig.subplots(max(n, 1), cols, squeeze=False)
    for i in range(n):
        pairs = zip(examples.deltas, examples.transformed, strict=True)
        columns = [("x", examples.x[i])] + [(f"delta={float(d):.2f}", t[i]) for d, t in pairs]
        for j, (title, img) in enumerate(columns):
            ax = axes[i][j]
            data, kwargs = _to_image(img)
            ax.imshow(data, interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize="small")
        if examples.samples is not None:
            sample = examples.samples[i]
            color = "tab:green" if sample.get("certified") else "tab:red"
            axes[i][0].set_ylabel(example_caption(sample), fontsize="x-small", color=color)
    return fig


def build_figures(results: Sequence[Mapping[str, Any]], examples: Examples = None) -> dict[str, Figure]:
    """Every figure of the report, keyed by FIGURES name ('pareto' only with two results or more,
    'examples' only when examples given)."""
    figs = {
        "accuracy_pca": figure_accuracy_pca(results),
        **({"pareto": figure_pareto(results)} if len(results) >= 2 else {}),
        "pca_epsilon": figure_pca_epsilon(results),
        "sparsity": figure_sparsity(results),
        "epsilon": figure_epsilon(results),
        "margins": figure_margins(results),
    }
    examples = as_examples(examples)
    if examples is not None:
        figs["examples"] = figure_examples(examples)
    return figs


# ----------------------------------------------------------------------------- output


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a Figure (Agg canvas; no pyplot global state, so safe in a threaded server)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def render_figure_png(
    results: Sequence[Mapping[str, Any]],
    name: str = "accuracy_pca",
    examples: Examples = None,
    dpi: int = 100,
) -> bytes:
    """PNG of one named figure. Unknown name (or 'examples' without examples, 'pareto' with fewer
    than two results) -> ValueError."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; valid: {', '.join(FIGURES)}")
    if name == "pareto" and len(results) < 2:
        raise ValueError("no Pareto plot: the job has a single variant (a sweep has several)")
    if name == "examples":
        examples = as_examples(examples)
        if examples is None:
            raise ValueError("no example images for this report")
        return figure_png(figure_examples(examples), dpi)
    builders = {
        "accuracy_pca": figure_accuracy_pca,
        "pareto": figure_pareto,
        "pca_epsilon": figure_pca_epsilon,
        "sparsity": figure_sparsity,
        "epsilon": figure_epsilon,
        "margins": figure_margins,
    }
    return figure_png(builders[name](results), dpi)


def binomial_pca(cert: Mapping[str, Any]) -> float | None:
    """PCA under the distribution-free bound whatever bound the certificate used: the share of its
    samples that are correct with clopper_pearson_upper(failures, draws, beta) <= epsilon (the
    samples' own counts; beta = params.beta, else DEFAULT_BETA). Shown beside the certificate's own
    PCA; None when the certificate has no per-sample counts."""
    samples, params = cert.get("samples") or [], cert.get("params") or {}
    counted = all(s.get("draws") and "failures" in s for s in samples)
    if not samples or "epsilon" not in params or not counted:
        return None
    beta, eps = float(params.get("beta") or DEFAULT_BETA), float(params["epsilon"])
    ok = sum(
        s["pred"] == s["label"] and clopper_pearson_upper(s["failures"], s["draws"], beta) <= eps
        for s in samples
    )
    return ok / len(samples)


def summary_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per result: name, method, prune_ratio, accuracy, pca, pca_binomial (binomial_pca),
    sparsity, certified, samples, failure_probability (None where unknown)."""
    rows = []
    for r in results:
        cert = r.get("certificate") or {}
        samples = _samples(r)
        sparsity = (cert.get("model") or {}).get("sparsity")
        if sparsity is None:
            sparsity = (r.get("metrics") or {}).get("sparsity")
        rows.append(
            {
                "name": str(r["name"]),
                "method": str(r["method"]),
                "prune_ratio": float(r["prune_ratio"]),
                "accuracy": r.get("accuracy"),
                "pca": r.get("pca"),
                "pca_binomial": binomial_pca(cert),
                "sparsity": sparsity,
                "certified": sum(bool(s.get("certified")) for s in samples) if samples else None,
                "samples": len(samples) if samples else None,
                "failure_probability": cert.get("failure_probability"),
            }
        )
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def render_pdf(results: Sequence[Mapping[str, Any]], examples: Examples = None) -> bytes:
    """PDF: page 1 = summary table, then one page per figure of build_figures (5 pages, one more
    with a Pareto plot, one more with examples)."""
    buf = io.BytesIO()
    with PdfPages(buf) as pdf:
        pdf.savefig(_summary_figure(results))
        for fig in build_figures(results, examples).values():
            pdf.savefig(fig)
    return buf.getvalue()


SUMMARY_COLUMNS = [
    "name", "method", "prune ratio", "test accuracy", "PCA", "PCA binomial", "sparsity", "certified"
]  # fmt: skip


def _summary_cells(r: Mapping[str, Any]) -> list[Any]:
    """One summary_rows row as table cells: SUMMARY_COLUMNS, then the failure probability."""
    return [
        r["name"],
        r["method"],
        _fmt(r["prune_ratio"], 2),
        _fmt(r["accuracy"]),
        _fmt(r["pca"]),
        _fmt(r["pca_binomial"]),
        _fmt(r["sparsity"]),
        "-" if r["samples"] is None else f"{r['certified']}/{r['samples']}",
        _fmt(r["failure_probability"]),
    ]


def _summary_figure(results: Sequence[Mapping[str, Any]]) -> Figure:
    rows = summary_rows(results)
    fig = Figure(figsize=(11, 1.5 + 0.35 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title("carcert report: summary")
    header = [*SUMMARY_COLUMNS, "fail. prob."]
    cells = [_summary_cells(r) for r in rows] or [["-"] * len(header)]
    ax.table(cellText=cells, colLabels=header, loc="center")
    return fig


def _img_tag(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}
section{margin-bottom:2em}code{background:#f6f6f6;padding:0 3px}
table.header th{text-align:left}table.header td{text-align:left}
"""


def render_report(
    results: Sequence[Mapping[str, Any]],
    examples: Examples = None,
    *,
    title: str = "carcert report",
    standalone: bool = True,
) -> str:
    """HTML report with inline base64 PNG figures. Sections (element ids): header, summary,
    parameters, then one per FIGURES name (a note instead of a figure for pareto with a single
    result and for examples without images; the examples' samples also as a table).
    standalone=False returns only the <div class="carcert-report"> (for embedding in a page)."""
    figs = build_figures(results, examples)
    parts = [f'<div class="carcert-report"><h1>{html.escape(title)}</h1>', _header_section(results)]
    parts.append('<section id="summary"><h2>Summary</h2><table><tr>')
    header = [*SUMMARY_COLUMNS, "failure prob."]
    parts.append("".join(f"<th>{h}</th>" for h in header) + "</tr>")
    for r in summary_rows(results):
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in _summary_cells(r)) + "</tr>")
    parts.append("</table></section>")
    parts.append(_parameters_section(results))
    for name in FIGURES:
        parts.append(f'<section id="{name}"><h2>{html.escape(TITLES[name])}</h2>')
        if name in figs:
            parts.append(_img_tag(figs[name], TITLES[name]))
        else:
            parts.append(f"<p>{MISSING[name]}</p>")
        if name == "examples" and figs.get(name) is not None:
            parts.append(_examples_table(as_examples(examples)))
        parts.append("</section>")
    parts.append("</div>")
    body = "\n".join(parts)
    if not standalone:
        return body
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


MISSING = {
    "pareto": "A single variant: no Pareto plot. Submit a sweep (several methods or prune ratios, "
    "with vanilla as the unpruned reference) to compare PCA against sparsity.",
    "examples": "No example images are available for this job.",
}


def _examples_table(examples: ExampleImages | None) -> str:
    """The example rows as a table: test index, label, prediction, certified (check / cross)."""
    if examples is None or examples.samples is None:
        return ""
    rows = []
    for s in examples.samples:
        ok = bool(s.get("certified"))
        mark = f"{CHECK} certified" if ok else f"{CROSS} not certified"
        cells = (s.get("index"), s.get("label"), s.get("pred"), mark)
        rows.append(
            f'<tr class="example" data-certified="{str(ok).lower()}">'
            + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + "</tr>"
        )
    head = "<tr><th>test index</th><th>label</th><th>prediction</th><th>certified</th></tr>"
    return f'<table class="examples">{head}{"".join(rows)}</table>'


def transform_words(t: Mapping[str, Any] | None) -> str:
    """The certificate's transform (core.transforms describe()) as a sentence, not a dict."""
    if not t:
        return "-"
    strength = t.get("strength")
    at = f" at strength {float(strength):g}" if isinstance(strength, int | float) else ""
    kind = t.get("kind")
    if kind == "parametric":
        parts = [p for p in str(t.get("name", "")).split("+") if p]
        ranges = t.get("range_at_delta_1") or {}
        text = " then ".join(parts) + at + ", with delta drawn uniformly from [0, 1]"
        details = "; ".join(f"{p}: {ranges[p]}" for p in parts if p in ranges)
        return f"{text} (at delta = 1, {details})" if details else text
    if kind == "latent":
        size = f", moving the image by up to {float(t['delta_max_norm']):.3g} in L2 norm" if t.get(
            "delta_max_norm"
        ) is not None else ""  # fmt: skip
        if t.get("generator") == "pca":
            evr = t.get("explained_variance_ratio")
            share = f", which explains {float(evr):.1%} of their variance" if evr is not None else ""
            return (
                f"a shift along principal component {t.get('component')} of the training images"
                f"{share}{at}{size}"
            )
        return f"a shift along latent component {t.get('component')} of your encoder / decoder{at}{size}"
    if kind == "precomputed":
        return (
            f"precomputed variants of each test image ({t.get('variants_per_sample')} per image): the "
            "variant whose recorded delta is nearest to the sampled delta"
        )
    return ", ".join(f"{k} {v}" for k, v in sorted(t.items()))


def _duration_words(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(float(seconds), 60.0)
    return f"{int(minutes)} min {sec:.0f} s" if minutes >= 1 else f"{sec:.1f} s"


def header_rows(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(label, text) rows of the report's header: architecture, dataset, transform (in words), and
    duration (the job's own "job_seconds" when a result carries it, else the sum of the
    variants' metrics "seconds"), from the first certificate / metrics that has each."""
    cert = next((r.get("certificate") for r in results if r.get("certificate")), None) or {}
    metrics = next((r.get("metrics") for r in results if r.get("metrics")), None) or {}
    arch = (cert.get("model") or {}).get("arch") or metrics.get("arch")
    dataset = (cert.get("dataset") or {}).get("ref") or (metrics.get("dataset") or {}).get("ref")
    job_seconds = next((r["job_seconds"] for r in results if r.get("job_seconds") is not None), None)
    if job_seconds is None:
        each = [float(v) for r in results if (v := (r.get("metrics") or {}).get("seconds")) is not None]
        job_seconds = sum(each) if each else None
    return [
        ("architecture", str(arch or "-")),
        ("dataset", str(dataset or "-")),
        ("transform", transform_words(cert.get("transform"))),
        ("duration", _duration_words(job_seconds)),
    ]


def _header_section(results: Sequence[Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in header_rows(results)
    )
    return f'<section id="header"><table class="header">{rows}</table></section>'


def _parameters_section(results: Sequence[Mapping[str, Any]]) -> str:
    """Certification parameters, dataset and transform of the first certificate (shared by a job)."""
    cert = next((r.get("certificate") for r in results if r.get("certificate")), None) or {}
    items = []
    for key, value in sorted((cert.get("params") or {}).items()):
        items.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_fmt(value, 6))}</td></tr>")
    dataset = cert.get("dataset") or {}
    if dataset:
        items.append(f"<tr><th>dataset</th><td>{html.escape(str(dataset.get('ref')))}</td></tr>")
    transform = cert.get("transform")
    if transform:
        items.append(f"<tr><th>transform</th><td>{html.escape(transform_words(transform))}</td></tr>")
    table = "<table>" + "".join(items) + "</table>" if items else "<p>No certificate.</p>"
    return f'<section id="parameters"><h2>Certification parameters</h2>{table}</section>'
