"""The registry of training / pruning methods: one place that says what each method does.

Everything that branches on a method's kind (the spec's validation and sweep expansion, the
pipeline's shared pretraining and progress plan, core.baselines.run_method, the command lines)
asks this table instead of repeating a list of names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """name: as in JobSpec / --method; prunes: returns a mask (needs a prune ratio in (0, 1));
    shares_pretraining: its first step is plain cross-entropy pretraining, so one pretrained model
    serves every such variant of a sweep; searches_mask: optimises mask scores (a search stage);
    adversarial: trains with the L2 PGD adversarial loss (core.baselines.advtrain_loss)."""

    name: str
    prunes: bool
    shares_pretraining: bool
    searches_mask: bool
    adversarial: bool = False


REGISTRY: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("vanilla", prunes=False, shares_pretraining=True, searches_mask=False),
        MethodInfo("advtrain", prunes=False, shares_pretraining=False, searches_mask=False, adversarial=True),
        MethodInfo("lmp", prunes=True, shares_pretraining=True, searches_mask=False),
        MethodInfo(
            "advtrain+lmp", prunes=True, shares_pretraining=False, searches_mask=False, adversarial=True
        ),
        MethodInfo("hydra", prunes=True, shares_pretraining=True, searches_mask=True),
        MethodInfo("car", prunes=True, shares_pretraining=True, searches_mask=True),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def method_info(name: str) -> MethodInfo:
    """The registry entry of `name` (KeyError for an unknown method)."""
    return REGISTRY[name]


def prunes(name: str) -> bool:
    """True for the methods that prune (all but vanilla and advtrain)."""
    return REGISTRY[name].prunes
