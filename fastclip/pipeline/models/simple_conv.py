"""SimpleConv: the paper's one-conv-layer model (conv 3x3 -> BN -> ReLU -> linear)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastclip.lipschitz import Chain, register_bound_rule
from fastclip.pipeline.models.layers import ConvBN, make_normalize

__all__ = ["SimpleConv", "PADDING_MODES", "conv_output_size"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_output_size(size: int, kernel_size: int, padding: int, stride: int, dilation: int) -> int:
    """Side of a conv's output on a ``size`` x ``size`` input (nn.Conv2d's formula)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


class SimpleConv(nn.Module):
    """``fc1(flatten(relu(BN(conv1(normalize(x))))))`` with one conv of ``width``
    channels, by default 3x3 with padding 1 (spatial size preserved), so ``fc1`` has
    ``width * input_size**2`` inputs.

    The authors' SimpleConv experiments vary the conv: ``kernel_size``, ``padding``,
    ``stride``, ``dilation`` and ``padding_mode`` (one of :data:`PADDING_MODES`) are
    nn.Conv2d's, and ``fc1``'s input size follows the conv's output size.

    As in the authors' model the conv keeps its bias (nn.Conv2d's default), so
    ``bn=False`` still has an affine first layer. The model is built for one square
    ``input_size``; other sizes raise a ValueError.

    Example::

        >>> model = SimpleConv(in_channels=1, input_size=28)
        >>> model(torch.rand(2, 1, 28, 28)).shape
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
        width: int = 64,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        dilation: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        for label, value, least in (
            ("kernel_size", kernel_size, 1),
            ("padding", padding, 0),
            ("stride", stride, 1),
            ("dilation", dilation, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{label} must be an integer >= {least}, got {value!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"unknown padding_mode {padding_mode!r}; choose one of {', '.join(PADDING_MODES)}"
            )
        if padding_mode == "reflect" and padding >= input_size:
            raise ValueError(
                f"padding_mode 'reflect' needs padding < input_size, got padding {padding} "
                f"on {input_size}x{input_size}"
            )
        out = conv_output_size(input_size, kernel_size, padding, stride, dilation)
        if out < 1:
            raise ValueError(
                f"a {kernel_size}x{kernel_size} conv (padding {padding}, stride {stride}, dilation "
                f"{dilation}) leaves no output on {input_size}x{input_size} inputs"
            )
        self.in_channels, self.num_classes, self.input_size, self.use_bn = (
            in_channels,
            num_classes,
            input_size,
            bn,
        )
        self.normalize = make_normalize(in_channels, mean, std)
        self.conv1 = ConvBN(
            in_channels,
            width,
            kernel_size=kernel_size,
            padding=padding,
            stride=stride,
            dilation=dilation,
            padding_mode=padding_mode,
            bias=True,
            bn=bn,
        )
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(width * out * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"SimpleConv was built for {self.input_size}x{self.input_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self.relu(self.conv1(self.normalize(x)))
        return self.fc1(torch.flatten(x, 1))


register_bound_rule(SimpleConv, lambda m: Chain([m.normalize, m.conv1, m.relu, m.fc1]))
