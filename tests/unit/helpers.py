"""Helpers shared by the unit tests of core.car, core.baselines and core.training."""

import pytest
import torch


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
