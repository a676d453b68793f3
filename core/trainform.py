"""The memory layout of the training, fine-tuning and CAR mask-search steps.

Measured on a 2-core AVX2 CPU (bench/bench_car_step.py --formats nchw,channels_last, bench/RESULTS.md
"Training and search steps in channels_last"): channels_last made a vanilla training step 1.10-1.14x
and a CAR search step 1.25-1.31x faster (small_cnn 28x28, resnet18 32x32). With
CARCERT_TRAIN_FORM=channels_last every step of core.training.train_epochs (pretraining,
fine-tuning, the baselines' training) and of core.car.search_mask runs with the network's 4-d
weights and the input batches in channels_last. It computes the same function (float32 kernels,
rounding differences only), so results match NCHW within float noise, not bit for bit.

Default: eager (NCHW, as before). Not channels_last, although it pays: its rounding changes every
CAR result, and at the seed of tests/unit/test_car.py's decisive experiment the default search's
margin over its random-sign control drops from above 0.08 to 0.055 under channels_last (the
test's threshold is 0.08): the claim's margin at one seed is within float noise, which needs a
multi-seed test before the default can move (bench/RESULTS.md).

`channels_last_steps(model, tensors)` converts the model (in place, parameters keep their identity,
so optimisers and masks bound to them stay valid) and the given 4-d leaf tensors (e.g. CAR scores)
for the duration and back to the contiguous layout afterwards (safetensors needs it); it yields the
function that formats an input batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

TRAIN_FORM_ENV = "CARCERT_TRAIN_FORM"
TRAIN_FORMS = ("channels_last", "eager")
DEFAULT_TRAIN_FORM = "eager"


def train_form() -> str:
    """CARCERT_TRAIN_FORM: one of TRAIN_FORMS (unset or empty: DEFAULT_TRAIN_FORM; else ValueError)."""
    value = os.environ.get(TRAIN_FORM_ENV, DEFAULT_TRAIN_FORM).strip().lower() or DEFAULT_TRAIN_FORM
    if value not in TRAIN_FORMS:
        raise ValueError(f"{TRAIN_FORM_ENV} must be one of {', '.join(TRAIN_FORMS)}; got {value!r}")
    return value


def _identity(x: Tensor) -> Tensor:
    return x


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _relayout(tensors: Iterable[Tensor], fmt: torch.memory_format) -> None:
    with torch.no_grad():
        for t in tensors:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=fmt)


@contextmanager
def channels_last_steps(
    model: nn.Module, tensors: Iterable[Tensor] = ()
) -> Iterator[Callable[[Tensor], Tensor]]:
    """The module docstring's layout for the steps run inside; yields the input formatter (the
    identity when the form is eager or the model has no 4-d weight)."""
    tensors = list(tensors)
    if train_form() != "channels_last" or not any(p.dim() == 4 for p in model.parameters()):
        yield _identity
        return
    model.to(memory_format=torch.channels_last)
    _relayout(tensors, torch.channels_last)
    try:
        yield _channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)
        _relayout(tensors, torch.contiguous_format)


__all__ = ["DEFAULT_TRAIN_FORM", "TRAIN_FORMS", "TRAIN_FORM_ENV", "channels_last_steps", "train_form"]
