"""Helpers shared by the unit tests of core.car, core.baselines and core.training."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small nets: one thread is faster than two on a shared 2-core machine (no spin contention).
    Import it into a test module to apply it there (autouse, per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brightness(x, delta, index=None):
    """A semantic transform T(x, delta) = x (1 - delta / 2) (the signature core.transforms uses)."""
    return x * (1 - 0.5 * delta.view(-1, 1, 1, 1))


def random_bn_stats(model: nn.Module, spread: float = 0.2) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine parameters (not the init values)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-spread, spread)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-spread / 2, spread / 2)
    return model
