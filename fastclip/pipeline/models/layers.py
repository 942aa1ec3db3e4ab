"""Building blocks shared by the models: input normalisation and a conv + batch-norm pair."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fastclip.lipschitz import register_linear_layer

__all__ = ["Normalize", "ConvBN", "make_normalize"]


class Normalize(nn.Module):
    """Per-channel affine normalisation ``y[:, c] = (x[:, c] - mean[c]) / std[c]``.

    It is the first layer of every model so that the model consumes pixels in [0, 1]
    and attacks stay in pixel space. ``mean`` and ``std`` are buffers (saved in the
    state_dict, never trained).

    Example::

        >>> norm = Normalize((0.5,), (0.25,))
        >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be 1-D sequences of equal length, got {tuple(mean)} and {tuple(std)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0 in every channel, got {tuple(std)}")
        # (C, 1, 1) broadcasts over (N, C, H, W).
        self.register_buffer("mean", mean_t.reshape(-1, 1, 1))
        self.register_buffer("std", std_t.reshape(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return (
            f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, "
            f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"
        )


def make_normalize(
    in_channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Normalize:
    """A :class:`Normalize` for ``in_channels`` channels; ``mean``/``std`` default to
    0 and 1 (the identity), and must have one value per channel.

    Example::

        >>> make_normalize(3).mean.flatten().tolist()
        [0.0, 0.0, 0.0]
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = (0.0,) * in_channels if mean is None else tuple(mean)
    std = (1.0,) * in_channels if std is None else tuple(std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != in_channels:
            raise ValueError(f"{label} needs one value per input channel ({in_channels}), got {values}")
    return Normalize(mean, std)


class ConvBN(nn.Sequential):
    """``bn(conv(x))``: a 2-D convolution and the batch norm that follows it.

    Clipping methods look for ConvBN modules to treat the composition
    ``x -> BN(W * x)`` as one implicitly linear operator (the paper's wBN mode).
    With ``bn=False`` the ``.bn`` attribute is ``nn.Identity`` so the model holds no
    batch norm at all (noBN mode) while keeping the same module names. It is an
    ``nn.Sequential`` (children ``conv``, ``bn``) so that
    :class:`~fastclip.linalg.operator.AffineOperator` knows the pair's linear part in closed
    form, ``x -> s * (W * x)`` with BN's per-channel scale ``s``.

    Example::

        >>> layer = ConvBN(3, 8, kernel_size=3, padding=1)
        >>> layer(torch.zeros(2, 3, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        bn: bool = True,
        dilation: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=padding,
                    bias=bias,
                    dilation=dilation,
                    padding_mode=padding_mode,
                ),
                bn=nn.BatchNorm2d(out_channels) if bn else nn.Identity(),
            )
        )


# The report measures the input normalisation as one affine layer.
register_linear_layer(Normalize, "normalize")
