"""Networks no registry knows, exported with torch.export for the program tests (unit, CLI, REST).

Every builder returns an nn.Module for 1 x 8 x 8 inputs (scikit-learn digits) and 10 classes;
`export(module, path, mode)` writes its torch.export program (batch dimension dynamic)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim


class TwoHeadGroupNet(nn.Module):
    """Grouped conv + depthwise conv + BatchNorm + GELU + dropout, two linear heads summed."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.drop = nn.Dropout(dropout)
        self.head_a = nn.Linear(16, 10)
        self.head_b = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.bn1(self.stem(x)))
        x = nn.functional.gelu(self.bn2(self.grouped(x)))
        x = self.depthwise(x).mean((2, 3))
        x = self.drop(x)
        return self.head_a(x) + self.head_b(x)


def torchvision_new_head() -> nn.Module:
    """torchvision's mobilenet_v3_small (hardswish, squeeze-excitation, BatchNorm) with a
    1-channel stem and a new 10-class head."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    net = mobilenet_v3_small(weights=None)
    net.features[0][0] = nn.Conv2d(1, 16, 3, stride=1, padding=1, bias=False)
    net.classifier[3] = nn.Linear(net.classifier[3].in_features, 10)
    return net


class NoWeights(nn.Module):
    """A classifier with a matmul parameter but no conv / linear op: nothing to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.proj


class TupleOut(TwoHeadGroupNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out, out


class FlatOut(TwoHeadGroupNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sum(1)


def export(
    module: nn.Module,
    path: Path,
    mode: str = "eval",
    shape: tuple[int, ...] = (1, 8, 8),
    dynamic_batch: bool = True,
) -> Path:
    """torch.export.save of `module` captured in `mode` ("eval" or "train") on a batch of 4."""
    module.train(mode == "train")
    dyn = {"x": {0: Dim("batch")}} if dynamic_batch else None
    ep = torch.export.export(module, (torch.rand(4, *shape),), dynamic_shapes=dyn)
    torch.export.save(ep, str(path))
    return path


class TinyViT(nn.Module):
    """Patch-embedding conv + one transformer encoder layer (attention, LayerNorm, dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, 16))
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.enc(t).mean(1))


class StochasticDepthNet(TwoHeadGroupNet):
    """A residual branch dropped at random in train mode (torchvision's StochasticDepth)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.sd = StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.sd(x))
