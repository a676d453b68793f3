"""core.report: the figures draw exactly the input numbers (read back from the matplotlib objects),
the HTML has every section, the PDF is a PDF with one page per figure + the summary page."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from core import report


def _certificate(rng: np.random.Generator, n_samples: int, layers: list[tuple[str, float]]) -> dict:
    d = rng.uniform(0.0, 0.5, n_samples)
    z = rng.uniform(0.0, 0.5, n_samples)
    eps = np.where(rng.uniform(size=n_samples) < 0.3, 0.0, 10.0 ** rng.uniform(-9, 0, n_samples))
    certified = (eps <= 1e-3) & (rng.uniform(size=n_samples) < 0.9)
    return {
        "job_id": "j",
        "model": {
            "arch": "small_cnn",
            "sparsity": float(np.mean([s for _, s in layers])),
            "layers": [{"name": n, "sparsity": s} for n, s in layers],
        },
        "dataset": {"ref": "digits", "sha256": "ab" * 32},
        "transform": {"kind": "parametric", "name": "brightness"},
        "params": {"n": 100, "l": 10, "alpha": 0.9, "epsilon": 1e-3, "samples": n_samples, "seed": 0},
        "failure_probability": 1e-5,
        "accuracy": 0.9,
        "pca": float(certified.mean()),
        "samples": [
            {
                "index": i,
                "label": 1,
                "pred": 1,
                "d": float(d[i]),
                "max_z": float(z[i]),
                "epsilon_bound": float(eps[i]),
                "t_star": 1.0,
                "certified": bool(certified[i]),
            }
            for i in range(n_samples)
        ],
    }


@pytest.fixture
def results() -> list[dict]:
    rng = np.random.default_rng(0)
    names = ["features.0.weight", "features.2.weight", "classifier.weight"]
    out = []
    for method, ratios in (("car", [0.3, 0.7, 0.5]), ("lmp", [0.5, 0.3]), ("vanilla", [0.0])):
        for pr in ratios:
            layers = [(n, float(pr if method != "vanilla" else 0.0) + 0.01 * k) for k, n in enumerate(names)]
            cert = _certificate(rng, 25, layers)
            out.append(
                {
                    "name": f"{method}-{pr:.2f}",
                    "method": method,
                    "prune_ratio": pr,
                    "accuracy": float(rng.uniform(0.5, 1.0)),
                    "pca": cert["pca"],
                    "certificate": cert,
                    "metrics": {"layers": cert["model"]["layers"]},
                }
            )
    return out


@pytest.fixture
def examples() -> report.ExampleImages:
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(3, 1, 8, 8)).astype(np.float32)
    deltas = [0.0, 0.5, 1.0]
    return report.ExampleImages(x=x, deltas=deltas, transformed=[np.clip(x + d * 0.3, 0, 1) for d in deltas])


def test_accuracy_pca_lines_are_the_input_sorted_by_ratio(results):
    fig = report.figure_accuracy_pca(results)
    ax_acc, ax_pca = fig.axes
    assert (ax_acc.get_title(), ax_pca.get_title()) == ("Accuracy", "PCA")
    for ax, key in ((ax_acc, "accuracy"), (ax_pca, "pca")):
        lines = {line.get_label(): line for line in ax.lines}
        assert set(lines) == {"car", "lmp", "vanilla"}
        for method, line in lines.items():
            rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["prune_ratio"])
            np.testing.assert_array_equal(line.get_xdata(), [r["prune_ratio"] for r in rows])
            np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in rows])


def test_sparsity_bars_heights_equal_layer_sparsity(results):
    fig = report.figure_sparsity(results)
    ax = fig.axes[0]
    containers = ax.containers
    assert [c.get_label() for c in containers] == [r["name"] for r in results]
    layer_names = [t.get_text() for t in ax.get_xticklabels()]
    assert layer_names == [entry["name"] for entry in results[0]["certificate"]["model"]["layers"]]
    for container, r in zip(containers, results, strict=True):
        heights = [p.get_height() for p in container.patches]
        expected = [entry["sparsity"] for entry in r["certificate"]["model"]["layers"]]
        np.testing.assert_allclose(heights, expected)
        # bars of one result sit at its layer positions (group centre +- offset < 0.5)
        centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
        np.testing.assert_array_equal(np.round(centres), np.arange(len(expected)))


def test_sparsity_falls_back_to_metrics_layers():
    r = {
        "name": "lmp-0.50",
        "method": "lmp",
        "prune_ratio": 0.5,
        "accuracy": 0.8,
        "pca": None,
        "certificate": None,
        "metrics": {"layers": [{"name": "a", "sparsity": 0.25}, {"name": "b", "sparsity": 0.75}]},
    }
    ax = report.figure_sparsity([r]).axes[0]
    assert [p.get_height() for p in ax.containers[0].patches] == [0.25, 0.75]


def test_epsilon_histogram_counts_match_numpy(results):
    fig = report.figure_epsilon(results, bins=12)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [r["name"] for r in results]
    logs_all = np.concatenate(
        [
            np.log10(np.maximum([s["epsilon_bound"] for s in r["certificate"]["samples"]], 1e-16))
            for r in results
        ]
    )
    edges = np.linspace(logs_all.min(), logs_all.max(), 13)
    for ax, r in zip(panels, results, strict=True):
        eps = np.array([s["epsilon_bound"] for s in r["certificate"]["samples"]])
        expected, _ = np.histogram(np.log10(np.maximum(eps, 1e-16)), bins=edges)
        heights = [p.get_height() for p in ax.patches]
        np.testing.assert_array_equal(heights, expected)
        assert sum(heights) == len(eps)
        (vline,) = [line for line in ax.lines if line.get_label() == "log10 epsilon"]
        assert vline.get_xdata()[0] == pytest.approx(np.log10(1e-3))


def test_margin_scatter_points_and_diagonal(results):
    fig = report.figure_margins(results)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(results)
    for ax, r in zip(panels, results, strict=True):
        samples = r["certificate"]["samples"]
        got = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
        for label, flag in (("certified", True), ("not certified", False)):
            expected = np.array([[s["d"], s["max_z"]] for s in samples if s["certified"] is flag]).reshape(
                -1, 2
            )
            np.testing.assert_array_equal(got[label], expected)
        (diag,) = [line for line in ax.lines if line.get_label() == "Z = d"]
        np.testing.assert_array_equal(diag.get_xdata(), diag.get_ydata())
        top = max(max(s["d"] for s in samples), max(s["max_z"] for s in samples))
        assert diag.get_xdata()[-1] >= top


def test_example_grid_shows_x_and_each_transformed_image(examples):
    fig = report.figure_examples(examples)
    axes = fig.axes
    cols = 1 + len(examples.deltas)
    assert len(axes) == examples.x.shape[0] * cols
    assert [ax.get_title() for ax in axes[:cols]] == ["x", "delta=0.00", "delta=0.50", "delta=1.00"]
    for i in range(examples.x.shape[0]):
        row = axes[i * cols : (i + 1) * cols]
        np.testing.assert_array_equal(row[0].images[0].get_array(), examples.x[i, 0])
        for k, t in enumerate(examples.transformed):
            np.testing.assert_array_equal(row[k + 1].images[0].get_array(), t[i, 0])
            assert row[k + 1].images[0].get_clim() == (0.0, 1.0)


def test_rgb_examples_are_hwc():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(1, 3, 5, 6)).astype(np.float32)
    ex = report.ExampleImages(x=x, deltas=[1.0], transformed=[1 - x])
    axes = report.figure_examples(ex).axes
    np.testing.assert_array_equal(axes[0].images[0].get_array(), np.transpose(x[0], (1, 2, 0)))
    np.testing.assert_allclose(axes[1].images[0].get_array(), np.transpose(1 - x[0], (1, 2, 0)))


def test_example_shape_mismatch_rejected():
    x = np.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        report.ExampleImages(x=x, deltas=[0.5], transformed=[np.zeros((2, 1, 4, 5))])


def test_html_has_every_section_and_inline_pngs(results, examples):
    page = report.render_report(results, examples, title="job <abc>")
    for section in ("summary", "parameters", *report.FIGURES):
        assert f'<section id="{section}">' in page
    assert "job &lt;abc&gt;" in page and "<abc>" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(report.FIGURES)
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    for r in results:  # the summary table lists every variant with its accuracy
        assert f"<td>{r['name']}</td>" in page
        assert f"<td>{r['accuracy']:.4f}</td>" in page
    certified = sum(s["certified"] for s in results[0]["certificate"]["samples"])
    assert f"<td>{certified}/25</td>" in page


def test_html_without_examples_says_so(results):
    page = report.render_report(results, standalone=False)
    assert page.startswith('<div class="carcert-report">') and "<html" not in page
    assert "No example images" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == len(report.FIGURES) - 1


def test_png_and_unknown_figure(results, examples):
    png = report.render_figure_png(results, "margins")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert report.render_figure_png(results, "examples", examples).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="valid"):
        report.render_figure_png(results, "nope")
    with pytest.raises(ValueError, match="no example"):
        report.render_figure_png(results, "examples")


def _pdf_pages(data: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", data))


@pytest.mark.parametrize("with_examples", [False, True])
def test_pdf_page_count(results, examples, with_examples):
    data = report.render_pdf(results, examples if with_examples else None)
    assert data.startswith(b"%PDF")
    assert data.rstrip().endswith(b"%%EOF")
    assert _pdf_pages(data) == 1 + 6 + int(with_examples)  # summary, 5 figures + the sweep's Pareto


def test_results_without_certificates_still_render():
    r = [
        {
            "name": "vanilla-0.00",
            "method": "vanilla",
            "prune_ratio": 0.0,
            "accuracy": 0.7,
            "pca": None,
            "certificate": None,
            "metrics": None,
        }
    ]
    page = report.render_report(r)
    assert "No certificate." in page
    assert report.render_pdf(r).startswith(b"%PDF")


def test_make_examples_applies_the_transform_at_each_delta():
    """brightness T(x, delta) = clip(x + 0.3 * delta, 0, 1) (core.transforms.PARAMETRIC)."""
    import torch

    from core.spec import TransformSpec
    from core.transforms import build_transform

    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    ex = report.make_examples(x, build_transform(TransformSpec(name="brightness")), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(ex.x, x.numpy())
    assert list(ex.deltas) == [0.0, 0.5, 1.0]
    for d, t in zip(ex.deltas, ex.transformed, strict=True):
        np.testing.assert_allclose(t, np.clip(x.numpy() + 0.3 * d, 0, 1), atol=1e-6)


def test_examples_accept_plain_tuples(examples):
    three = report.as_examples((examples.x, examples.deltas, examples.transformed))
    assert list(three.deltas) == list(examples.deltas)
    np.testing.assert_array_equal(three.x, examples.x)
    np.testing.assert_array_equal(np.stack(three.transformed), np.stack(examples.transformed))
    two = report.as_examples((examples.x, examples.transformed))
    assert list(two.deltas) == [1 / 3, 2 / 3, 1.0]
    fig = report.build_figures([], (examples.x, examples.transformed))["examples"]
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), examples.transformed[0][0, 0])
    with pytest.raises(ValueError, match="examples must be"):
        report.as_examples((examples.x,))


def test_summary_shows_the_binomial_pca_beside_the_certificates_own():
    """binomial_pca recomputes, from each sample's (failures, draws), the one-sided Clopper-Pearson
    decision (checked here with scipy's beta quantile directly): a cccert certificate that certifies
    zero-failure samples at N = 1000 draws has binomial PCA 0 at epsilon 1e-3 (N < ln(1/beta)/eps)
    and counts them at epsilon 1e-2; misclassified samples never count."""
    from scipy.stats import beta as beta_dist

    from core.report import binomial_pca, summary_rows

    samples = [
        {"label": 1, "pred": 1, "failures": 0, "draws": 1000, "certified": True},
        {"label": 2, "pred": 2, "failures": 3, "draws": 1000, "certified": False},
        {"label": 0, "pred": 3, "failures": 0, "draws": 1000, "certified": False},
        {"label": 4, "pred": 4, "failures": 1, "draws": 400, "certified": False},
    ]

    def upper(k: int, n: int, b: float) -> float:
        return float(beta_dist.ppf(1 - b, k + 1, n - k))

    for eps in (1e-3, 1e-2):
        cert = {"samples": samples, "params": {"epsilon": eps, "bound": "cccert"}}
        want = sum(s["pred"] == s["label"] and upper(s["failures"], s["draws"], 1e-3) <= eps for s in samples)
        assert binomial_pca(cert) == want / len(samples)
    assert binomial_pca({"samples": samples, "params": {"epsilon": 1e-3}}) == 0.0
    assert binomial_pca({"samples": samples, "params": {"epsilon": 1e-2}}) == 0.25  # only the first
    assert binomial_pca({"samples": samples, "params": {"epsilon": 1e-2, "beta": 0.5}}) > 0.25
    old = {"samples": [{"label": 1, "pred": 1, "certified": True}], "params": {"epsilon": 1e-3}}
    assert binomial_pca(old) is None  # a certificate without per-sample counts
    result = {"name": "car-0.50", "method": "car", "prune_ratio": 0.5, "accuracy": 0.9, "pca": 0.25,
              "certificate": {"samples": samples, "params": {"epsilon": 1e-2}}}  # fmt: skip
    row = summary_rows([result])[0]
    assert row["pca"] == 0.25 and row["pca_binomial"] == 0.25


def test_certified_accuracy_vs_epsilon_is_the_share_of_correct_samples_under_each_epsilon(results):
    """Each line is, at every epsilon e of its x grid, the share of samples with pred == label and
    eps_hat <= e (counted here sample by sample); the job's epsilon is marked."""
    results[0]["certificate"]["samples"][0]["pred"] = 7  # misclassified: never counts
    fig = report.figure_pca_epsilon(results)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("epsilon")}
    assert set(lines) == {r["name"] for r in results}
    assert ax.get_xscale() == "log"
    for r in results:
        line, samples = lines[r["name"]], r["certificate"]["samples"]
        xs, ys = line.get_xdata(), line.get_ydata()
        assert xs[-1] == pytest.approx(1.0) and xs[0] <= 1e-6
        for e, y in zip(xs[::17], ys[::17], strict=True):
            ok = [s["pred"] == s["label"] and s["epsilon_bound"] <= e for s in samples]
            assert y == pytest.approx(sum(ok) / len(samples))
    marks = [line for line in ax.lines if line.get_label().startswith("epsilon")]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == pytest.approx(1e-3)


def test_curve_at_the_jobs_epsilon_is_the_certificates_pca():
    samples = [
        {"label": 1, "pred": 1, "epsilon_bound": 0.0},
        {"label": 1, "pred": 1, "epsilon_bound": 5e-4},
        {"label": 1, "pred": 1, "epsilon_bound": 2e-3},
        {"label": 1, "pred": 0, "epsilon_bound": 0.0},
        {"label": 1, "pred": 1, "epsilon_bound": 1.0},  # stopped early
    ]
    for s in samples:
        s["certified"] = s["pred"] == s["label"] and s["epsilon_bound"] <= 1e-3
    r = {"certificate": {"samples": samples, "params": {"epsilon": 1e-3}}}
    curve = report.certified_accuracy_curve(r, np.array([1e-3, 1e-2, 1.0]))
    np.testing.assert_allclose(curve, [2 / 5, 3 / 5, 4 / 5])
    assert curve[0] == sum(s["certified"] for s in samples) / len(samples)


def test_a_single_job_draws_bars_not_a_lone_dot(results):
    one = [results[0]]
    fig = report.figure_accuracy_pca(one)
    (ax,) = fig.axes
    assert not any(len(line.get_xdata()) == 1 for line in ax.lines)
    acc, pca = ax.containers[:2]
    assert [b.get_height() for b in acc] == [one[0]["accuracy"]]
    assert [b.get_height() for b in pca] == [one[0]["pca"]]
    assert [t.get_text() for t in ax.get_xticklabels()] == [one[0]["name"]]
    # one variant per method (a method sweep at one ratio): bars too, one group per variant
    per_method = [r for r in results if r["prune_ratio"] == 0.5] + [results[-1]]
    ax = report.figure_accuracy_pca(per_method).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["name"] for r in per_method]


def test_transform_reads_as_words():
    from core.transforms import PARAMETRIC

    words = report.transform_words(
        {"kind": "parametric", "name": "brightness+blur", "strength": 2.0,
         "range_at_delta_1": {p: PARAMETRIC[p] for p in ("brightness", "blur")}}
    )  # fmt: skip
    assert words.startswith("brightness then blur at strength 2, with delta drawn uniformly from [0, 1]")
    assert PARAMETRIC["blur"] in words and "{" not in words
    pca = {"kind": "latent", "generator": "pca", "component": 0, "strength": 1.0,
           "delta_max_norm": 3.5, "explained_variance_ratio": 0.12, "fitted_on": 1000}  # fmt: skip
    assert report.transform_words(pca) == (
        "a shift along principal component 0 of the training images, which explains 12.0% of their "
        "variance at strength 1, moving the image by up to 3.5 in L2 norm"
    )
    assert "4 per image" in report.transform_words({"kind": "precomputed", "variants_per_sample": 4})


def test_header_names_arch_dataset_transform_and_duration(results):
    for r in results:
        r["job_seconds"] = 125.0
    page = report.render_report(results)
    header = page.split('<section id="header">')[1].split("</section>")[0]
    assert "<th>architecture</th><td>small_cnn</td>" in header
    assert "<th>dataset</th><td>digits</td>" in header
    assert "<th>transform</th><td>brightness, with delta drawn uniformly from [0, 1]</td>" in header
    assert "<th>duration</th><td>2 min 5 s</td>" in header
    assert "{&#x27;kind&#x27;" not in page and "{'kind'" not in page
    for r in results:
        r.pop("job_seconds")
        r["metrics"]["seconds"] = 2.0
    assert "<th>duration</th><td>12.0 s</td>" in report.render_report(results)  # 6 variants x 2 s


def test_pareto_is_pca_against_each_variants_sparsity_with_the_unpruned_reference(results):
    (ax,) = report.figure_pareto(results).axes
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    vanilla = next(r for r in results if r["method"] == "vanilla")
    ref_label = f"unpruned (vanilla-0.00): PCA {vanilla['pca']:.3f}"
    assert set(lines) == {"car", "lmp", ref_label}
    for method in ("car", "lmp"):
        # sparsity = the certificate's model.sparsity (mean of the layers' here), not the prune ratio
        pts = sorted(
            (float(np.mean([lay["sparsity"] for lay in r["certificate"]["model"]["layers"]])), r["pca"])
            for r in results
            if r["method"] == method
        )
        np.testing.assert_allclose(lines[method].get_xdata(), [x for x, _ in pts])
        np.testing.assert_array_equal(lines[method].get_ydata(), [y for _, y in pts])
    ref = lines[ref_label]
    assert list(ref.get_ydata()) == [vanilla["pca"]] * 2 and list(ref.get_xdata()) == [0, 1]  # axhline
    star = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_ydata()) == [vanilla["pca"]]


def test_pareto_without_an_unpruned_variant_says_so(results):
    pruned = [r for r in results if r["method"] != "vanilla"]
    (ax,) = report.figure_pareto(pruned).axes
    assert any("no unpruned variant" in t.get_text() for t in ax.texts)
    assert not any(line.get_label().startswith("unpruned") for line in ax.lines)


def test_a_single_variant_has_no_pareto_plot_but_a_sentence(results):
    one = [results[0]]
    assert "pareto" not in report.build_figures(one)
    page = report.render_report(one)
    assert '<section id="pareto">' in page and "A single variant: no Pareto plot" in page
    with pytest.raises(ValueError, match="single variant"):
        report.render_figure_png(one, "pareto")
    assert report.render_figure_png(results, "pareto").startswith(b"\x89PNG")


def test_examples_name_label_prediction_and_certified_mark(examples):
    samples = [
        {"index": 7, "label": 3, "pred": 3, "certified": True},
        {"index": 2, "label": 5, "pred": 5, "certified": False},
        {"index": 9, "label": 1, "pred": 4, "certified": False},
    ]
    with_samples = report.ExampleImages(examples.x, examples.deltas, examples.transformed, samples)
    axes = report.figure_examples(with_samples).axes
    cols = 1 + len(examples.deltas)
    first_column = [axes[i * cols] for i in range(3)]
    assert [ax.get_ylabel() for ax in first_column] == [
        "label 3, pred 3\n\u2713 certified",
        "label 5, pred 5\n\u2717 not certified",
        "label 1, pred 4\n\u2717 not certified",
    ]
    assert [ax.yaxis.label.get_color() for ax in first_column] == ["tab:green", "tab:red", "tab:red"]
    page = report.render_report([], with_samples)
    rows = re.findall(r'<tr class="example" data-certified="(\w+)">(.*?)</tr>', page)
    assert [flag for flag, _ in rows] == ["true", "false", "false"]
    assert [re.findall(r"<td>(.*?)</td>", cells)[:3] for _, cells in rows] == [
        ["7", "3", "3"], ["2", "5", "5"], ["9", "1", "4"]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="one certificate sample per example"):
        report.ExampleImages(examples.x, examples.deltas, examples.transformed, samples[:2])


def test_saved_examples_round_trip_as_uint8_thumbnails(tmp_path, examples):
    certificate_samples = [{"index": i, "label": i % 7, "pred": i % 5, "certified": i > 5} for i in range(9)]
    samples = [certificate_samples[i] for i in (3, 5, 8)]
    ex = report.ExampleImages(examples.x, examples.deltas, examples.transformed, samples)
    report.save_examples(tmp_path / "examples.npz", ex)
    back = report.load_examples(tmp_path / "examples.npz", certificate_samples)
    np.testing.assert_array_equal(back.x, np.round(examples.x * 255).astype(np.uint8) / np.float32(255))
    for got, want in zip(back.transformed, examples.transformed, strict=True):
        np.testing.assert_allclose(got, want, atol=0.5 / 255 + 1e-7)  # 8x8: kept at full size
    assert list(back.deltas) == list(examples.deltas)
    assert back.samples == [certificate_samples[i] for i in (3, 5, 8)]  # found by test index


def test_saved_examples_are_scaled_down_to_thumbnails(tmp_path):
    """A 3 x 300 x 200 image is kept at 96 x 64 (the longer side THUMBNAIL_SIDE), its mean colour
    unchanged by the antialiased scaling; nothing is unpickled when loading."""
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(1, 3, 300, 200)).astype(np.float32)
    ex = report.ExampleImages(x, [1.0], [1.0 - x], [{"index": 0, "label": 1, "pred": 1, "certified": True}])
    report.save_examples(tmp_path / "e.npz", ex)
    back = report.load_examples(tmp_path / "e.npz", ex.samples)
    assert back.x.shape == (1, 3, 96, 64) and back.transformed[0].shape == (1, 3, 96, 64)
    np.testing.assert_allclose(back.x.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=0.01)
    np.testing.assert_allclose(back.transformed[0].mean(axis=(2, 3)), 1 - x.mean(axis=(2, 3)), atol=0.01)
    pickled = np.array([object()], dtype=object)
    np.savez(tmp_path / "bad.npz", x=pickled, transformed=x, deltas=[1.0], indices=[0])
    with pytest.raises(ValueError, match="pickle"):
        report.load_examples(tmp_path / "bad.npz", ex.samples)
