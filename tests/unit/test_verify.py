"""core.verify.model_entry_of against core.certify.describe_model (the certificate's own
computation through the module tree) for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from core.certify import describe_model
from core.masking import prunable_weights, save_masks, topk_mask
from core.models import ARCHS, build_model, save_weights
from core.verify import model_entry_of


@pytest.mark.parametrize("arch", ARCHS)
def test_files_give_the_certificates_model_entry(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, small_input=True)
    masks = topk_mask({k: v.detach() for k, v in prunable_weights(model).items()}, 0.3)
    save_weights(model, tmp_path / "m.safetensors")
    save_masks(tmp_path / "k.safetensors", masks)
    want = describe_model(model, arch, None, masks)
    got = model_entry_of(tmp_path / "m.safetensors", tmp_path / "k.safetensors")
    for key in ("params", "nonzero", "sparsity"):
        assert got[key] == want[key], key
    assert sorted(got["layers"], key=lambda e: e["name"]) == sorted(want["layers"], key=lambda e: e["name"])
    assert 0.29 < got["sparsity"] < 0.31
