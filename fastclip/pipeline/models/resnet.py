"""ResNet18 in its CIFAR form (kuangliu/pytorch-cifar): 3x3 stem with stride 1, no max-pool,
BasicBlocks [2, 2, 2, 2], global average pooling, one linear layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.linalg.operator import unwrap
from fastclip.lipschitz import Chain, Residual, register_bound_rule
from fastclip.pipeline.models.layers import ConvBN, make_normalize

__all__ = ["BasicBlock", "ResNet", "ResNet18"]


class BasicBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + shortcut(x))`` where conv1/conv2 are 3x3 ConvBN and
    the shortcut is the identity, or a 1x1 ConvBN when the stride or width changes.

    With ``halve_shortcut=True`` (the authors' FastClip ResNet18) a block whose
    shortcut has a conv returns ``relu((out + shortcut(x)) / 2)``: if both branches are
    1-Lipschitz, their average is too, whereas the plain sum can be 2-Lipschitz.

    Example::

        >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, bn: bool = True, halve_shortcut: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_planes, planes, 3, stride=stride, padding=1, bn=bn)
        self.conv2 = ConvBN(planes, planes, 3, stride=1, padding=1, bn=bn)
        # fixed here, not read from the shortcut's type later: a clipping method that wraps
        # the shortcut must not change what the forward computes
        self.has_conv_shortcut = stride != 1 or in_planes != self.expansion * planes
        if self.has_conv_shortcut:
            self.shortcut: nn.Module = ConvBN(in_planes, self.expansion * planes, 1, stride=stride, bn=bn)
        else:
            self.shortcut = nn.Identity()
        self.halve_shortcut = halve_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        out = out + self.shortcut(x)
        if self.halve_shortcut and self.has_conv_shortcut:
            out = out / 2
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-form ResNet with BasicBlocks; adaptive average pooling makes any square
    input size work (32x32 gives kuangliu's 4x4 average pool exactly).

    Example::

        >>> ResNet((1, 1, 1, 1), in_channels=1)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        bn: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        halve_shortcut: bool = False,
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
        self.halve_shortcut = halve_shortcut
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = ConvBN(in_channels, 64, 3, stride=1, padding=1, bn=bn)
        self._in_planes = 64
        self.layer1 = self._make_layer(64, num_blocks[0], 1, bn, halve_shortcut)
        self.layer2 = self._make_layer(128, num_blocks[1], 2, bn, halve_shortcut)
        self.layer3 = self._make_layer(256, num_blocks[2], 2, bn, halve_shortcut)
        self.layer4 = self._make_layer(512, num_blocks[3], 2, bn, halve_shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int, bn: bool, halve_shortcut: bool) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self._in_planes, planes, s, bn=bn, halve_shortcut=halve_shortcut))
            self._in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(self.normalize(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def ResNet18(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    bn: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    halve_shortcut: bool = False,
) -> ResNet:
    """ResNet18, CIFAR form: 11,173,962 parameters for 3 channels, 10 classes, BN.

    Example::

        >>> sum(p.numel() for p in ResNet18().parameters())
        11173962
    """
    return ResNet(
        (2, 2, 2, 2),
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        bn=bn,
        mean=mean,
        std=std,
        halve_shortcut=halve_shortcut,
    )


# The report's rules for these forwards (the ReLUs are functional, Lipschitz 1).
register_bound_rule(
    BasicBlock,
    lambda m: Residual(
        [m.conv1, m.conv2],
        None if isinstance(unwrap(m.shortcut), nn.Identity) else m.shortcut,
        0.5 if m.halve_shortcut and m.has_conv_shortcut else 1.0,
    ),
)
register_bound_rule(
    ResNet,
    lambda m: Chain([m.normalize, m.conv1, m.layer1, m.layer2, m.layer3, m.layer4, m.pool, m.linear]),
)
