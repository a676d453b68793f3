"""bench/table1.py: the sweep JobSpec it builds and the RESULTS.md section it rewrites (no training)."""

from __future__ import annotations

from bench.table1 import build_spec, parse_args, update_results


def test_spec_is_one_sweep_of_every_method_and_ratio() -> None:
    spec = build_spec(parse_args(["--arch", "resnet18", "--ratios", "0.5", "0.7", "--samples", "7"]))
    got = [(v.method, v.prune_ratio) for v in spec.variants()]
    want = [("vanilla", 0.0)] + [(m, r) for m in ("lmp", "hydra", "car") for r in (0.5, 0.7)]
    assert got == want
    assert spec.model.arch == "resnet18" and spec.certification.samples == 7
    # METHOD.md CC-Cert defaults unless overridden
    c = spec.certification
    assert (c.n, c.l, c.alpha, c.epsilon) == (100, 10, 0.9, 1e-3)


def test_update_results_touches_only_its_section(tmp_path) -> None:
    path = tmp_path / "RESULTS.md"
    other = "## API\n\nnumbers of someone else\n"
    path.write_text("# Benchmark results\n\n" + other + "\n## Later\n\nkeep me\n")
    update_results(path, "first body")
    update_results(path, "second body")
    text = path.read_text()
    assert text.count("## Table 1") == 1 and "second body" in text and "first body" not in text
    assert other in text and "## Later\n\nkeep me\n" in text
    # a section in the middle is replaced in place, the following one stays
    path.write_text("# R\n\n## Table 1\n\nold\n\n## Later\n\nkeep me\n")
    update_results(path, "new")
    assert path.read_text() == "# R\n\n## Table 1\n\nnew\n\n## Later\n\nkeep me\n"
