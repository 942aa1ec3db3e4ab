"""SimpleConv: the paper's one-conv-layer model (conv 3x3 -> BN -> ReLU -> linear)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastclip.models.layers import ConvBN, make_normalize

__all__ = ["SimpleConv"]


class SimpleConv(nn.Module):
    """``fc1(flatten(relu(BN(conv1(normalize(x))))))`` with a 3x3 conv of ``width``
    channels, padding 1 (spatial size preserved), so ``fc1`` has
    ``width * input_size**2`` inputs.

    As in the authors' model the conv keeps its bias (nn.Conv2d's default), so
    ``bn=False`` still has an affine first layer. The model is built for one square
    ``input_size``; other sizes raise a ValueError.

    Example::

        >>> model = SimpleConv(in_channels=1, input_size=28)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, bn: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 width: int = 64) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        self.in_channels, self.num_classes, self.input_size, self.use_bn = in_channels, num_classes, input_size, bn
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = ConvBN(in_channels, width, kernel_size=3, padding=1, bias=True, bn=bn)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(width * input_size * input_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"SimpleConv was built for {self.input_size}x{self.input_size} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.relu(self.conv1(self.normalize(x)))
        return self.fc1(torch.flatten(x, 1))
