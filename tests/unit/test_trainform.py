"""core.trainform: training and mask-search steps in channels_last compute what NCHW computes (float
noise only), leave the model and the scores contiguous (safetensors can save them) with the same
parameter objects; CARCERT_TRAIN_FORM=channels_last switches it on (default: eager NCHW)."""

from __future__ import annotations

import pytest
import torch

from core.car import search_mask
from core.models import build_model, save_weights
from core.spec import CarSpec
from core.trainform import TRAIN_FORM_ENV, channels_last_steps, train_form
from core.training import train_epochs
from core.transforms import ParametricTransform


def _cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_layout_inside_and_restored_after(monkeypatch) -> None:
    monkeypatch.setenv(TRAIN_FORM_ENV, "channels_last")
    model = build_model("small_cnn", 4, 3)
    params = list(model.parameters())
    extra = torch.rand(8, 3, 3, 3)
    with pytest.raises(RuntimeError, match="boom"), channels_last_steps(model, [extra]) as fmt:
        assert all(_cl(p) for p in model.parameters() if p.dim() == 4) and _cl(extra)
        assert _cl(fmt(torch.rand(2, 3, 8, 8))) and fmt(torch.rand(2, 5)).is_contiguous()
        raise RuntimeError("boom")  # restored on the way out of a failed step too
    assert all(p.is_contiguous() for p in model.parameters()) and extra.is_contiguous()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    monkeypatch.setenv(TRAIN_FORM_ENV, "eager")
    with channels_last_steps(model) as fmt:
        assert all(p.is_contiguous() for p in model.parameters())
        x = torch.rand(2, 3, 8, 8)
        assert fmt(x) is x
    monkeypatch.delenv(TRAIN_FORM_ENV)
    assert train_form() == "eager"  # the default (core.trainform's docstring says why)
    monkeypatch.setenv(TRAIN_FORM_ENV, "fast")
    with pytest.raises(ValueError, match=TRAIN_FORM_ENV):
        train_form()


def _train(form: str, monkeypatch, tmp_path) -> dict[str, torch.Tensor]:
    monkeypatch.setenv(TRAIN_FORM_ENV, form)
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(96, 3, 12, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    train_epochs(model, x, y, epochs=2, lr=0.05, batch_size=32, seed=0)
    save_weights(model, tmp_path / f"{form}.safetensors")  # contiguous again: safetensors accepts it
    scores = search_mask(model, x, y, ParametricTransform("brightness", 0.5), CarSpec(), prune_ratio=0.5,
                         epochs=1, batch_size=32, seed=0)
    assert all(s.is_contiguous() for s in scores.values())
    weights = {f"w/{k}": v for k, v in model.state_dict().items()}
    return {**weights, **{f"m/{k}": v for k, v in scores.items()}}


def test_channels_last_training_and_search_match_nchw(monkeypatch, tmp_path) -> None:
    fast, ref = _train("channels_last", monkeypatch, tmp_path), _train("eager", monkeypatch, tmp_path)
    assert fast.keys() == ref.keys()
    for k in ref:
        # weights: float noise; scores: Adam's first steps move every entry by ~lr whatever its
        # gradient's size, so an entry whose gradient is ~0 may step the other way (3 steps of 1e-3)
        tol = 1e-4 if k.startswith("w/") else 6e-3 + 1e-4
        assert torch.allclose(fast[k].float(), ref[k].float(), atol=tol, rtol=1e-4), k
    moved = torch.cat([(fast[k] - ref[k]).abs().flatten() > 1e-4 for k in ref if k.startswith("m/")])
    assert moved.float().mean() < 0.01  # all but a few entries agree to 1e-4
