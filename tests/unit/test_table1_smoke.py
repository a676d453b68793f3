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


def test_proxy_pca_against_a_per_sample_loop() -> None:
    import torch
    from torch import nn

    from bench.table1 import proxy_pca

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.mul_(4.0)
    xs = torch.rand(40, 1, 4, 4)
    with torch.no_grad():
        ys = model(xs).argmax(1)
    ys[:5] = (ys[:5] + 1) % 3  # some misclassified samples

    def t(x, delta, index=None):
        return x * (1 - 0.6 * delta.view(-1, 1, 1, 1))

    want = 0
    with torch.no_grad():
        for x, y in zip(xs, ys, strict=True):
            p = model(x[None]).double().softmax(1)[0]
            top = p.sort(descending=True).values
            z = max(
                float((p - model(t(x[None], torch.tensor([g / 10]))).double().softmax(1)[0]).abs().max())
                for g in range(11)
            )
            want += int(p.argmax() == y and z < (top[0] - top[1]) / 2)
    assert 0 < want < 35  # some correct samples certify, some do not (5 are misclassified)
    assert proxy_pca(model, xs, ys, t, batch_size=7) == want / 40


def test_car_diagnostics_runs_lmp_and_a_variant(tmp_path) -> None:
    from bench.car_diagnostics import main, parse_variant

    assert parse_variant("x=mask_lr:0.1,ratio_mask:hard") == ("x", {"mask_lr": 0.1, "ratio_mask": "hard"})
    args = ["--out", str(tmp_path), "--dataset", "digits", "--train-subset", "300", "--pretrain-epochs", "1",
            "--search-epochs", "1", "--finetune-epochs", "1", "--ratios", "0.5", "--eval-samples", "50",
            "--augment-q", "50", "--variant", "hard=ratio_mask:hard"]  # fmt: skip
    assert main(args) == 0
    lines = (tmp_path / "diagnostics.md").read_text().splitlines()
    rows = [r.split("|")[1:-1] for r in lines if r.startswith("| ")]
    names = [r[0].strip() for r in rows[1:]]
    assert names == ["vanilla", "lmp", "car hard"]
    assert float(rows[2][4]) == 1.0 and 0.5 <= float(rows[3][4]) <= 1.0  # overlap with LMP
    assert (tmp_path / "pretrained.pt").is_file()
