"""Shared test set-up: deterministic, small, CPU-only (2 cores here and on CI)."""

import os

import pytest
import torch

os.environ.setdefault("CARCERT_TESTING", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
