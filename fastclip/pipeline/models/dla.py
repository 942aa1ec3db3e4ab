"""DLA (Deep Layer Aggregation, arXiv:1707.06484) in kuangliu/pytorch-cifar's CIFAR form:
trees of BasicBlocks whose outputs are aggregated by 1x1 Root convs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.pipeline.models.layers import ConvBN, make_normalize
from fastclip.pipeline.models.resnet import BasicBlock

__all__ = ["Root", "Tree", "DLA"]


class Root(nn.Module):
    """Aggregation node: ``relu(BN(conv(cat(xs, dim=1))))`` with a ``kernel_size`` conv
    (1x1 by default) mapping the concatenated channels to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bn: bool = True) -> None:
        super().__init__()
        self.conv = ConvBN(
            in_channels, out_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bn=bn
        )

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.conv(torch.cat(xs, 1)))


class Tree(nn.Module):
    """A DLA tree of depth ``level``.

    level 1: ``root([left(x), right(left(x))])`` with two BasicBlocks.
    level L > 1: the outputs of ``prev_root(x)``, of the subtrees ``level_{L-1}`` ...
    ``level_1`` applied in sequence, and of two more BasicBlocks after them, are
    concatenated ((L + 2) * out_channels channels) and aggregated by the root.
    """

    def __init__(
        self, in_channels: int, out_channels: int, level: int = 1, stride: int = 1, bn: bool = True
    ) -> None:
        super().__init__()
        self.level = level
        if level == 1:
            self.root = Root(2 * out_channels, out_channels, bn=bn)
            self.left_node = BasicBlock(in_channels, out_channels, stride=stride, bn=bn)
            self.right_node = BasicBlock(out_channels, out_channels, stride=1, bn=bn)
        else:
            self.root = Root((level + 2) * out_channels, out_channels, bn=bn)
            for i in reversed(range(1, level)):
                self.add_module(f"level_{i}", Tree(in_channels, out_channels, level=i, stride=stride, bn=bn))
            self.prev_root = BasicBlock(in_channels, out_channels, stride=stride, bn=bn)
            self.left_node = BasicBlock(out_channels, out_channels, stride=1, bn=bn)
            self.right_node = BasicBlock(out_channels, out_channels, stride=1, bn=bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.prev_root(x)] if self.level > 1 else []
        for i in reversed(range(1, self.level)):
            x = self.get_submodule(f"level_{i}")(x)
            xs.append(x)
        x = self.left_node(x)
        xs.append(x)
        x = self.right_node(x)
        xs.append(x)
        return self.root(xs)


class DLA(nn.Module):
    """kuangliu's CIFAR DLA: three 3x3 ConvBN+ReLU stages (16, 16, 32 channels), trees
    of widths 64/128/256/512 (levels 1/2/2/1, strides 1/2/2/2), global average pooling
    and a linear layer: 16,291,386 parameters for 3 channels, 10 classes, BN.

    Example::

        >>> DLA(in_channels=1)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        bn: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        self.in_channels, self.num_classes, self.input_size, self.use_bn = (
            in_channels,
            num_classes,
            input_size,
            bn,
        )
        self.normalize = make_normalize(in_channels, mean, std)
        self.base = nn.Sequential(ConvBN(in_channels, 16, 3, padding=1, bn=bn), nn.ReLU())
        self.layer1 = nn.Sequential(ConvBN(16, 16, 3, padding=1, bn=bn), nn.ReLU())
        self.layer2 = nn.Sequential(ConvBN(16, 32, 3, padding=1, bn=bn), nn.ReLU())
        self.layer3 = Tree(32, 64, level=1, stride=1, bn=bn)
        self.layer4 = Tree(64, 128, level=2, stride=2, bn=bn)
        self.layer5 = Tree(128, 256, level=2, stride=2, bn=bn)
        self.layer6 = Tree(256, 512, level=1, stride=2, bn=bn)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.base(self.normalize(x))))
        out = self.layer6(self.layer5(self.layer4(self.layer3(out))))
        return self.linear(torch.flatten(self.pool(out), 1))
