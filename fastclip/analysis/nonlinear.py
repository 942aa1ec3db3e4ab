"""The Lipschitz constants of the nonlinear layers a network bound multiplies in: the
elementwise activations (the sup of the derivative's absolute value, from what each
computes) and max pooling (from how many windows one input belongs to).

Example::

    >>> activation_constant(nn.ELU(alpha=-3.0))  # x < 0: the slope alpha e^x reaches |alpha|
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from fastclip.analysis.discovery import base_type
from fastclip.linalg.operator import unwrap

__all__ = ["ACTIVATION_LIPSCHITZ", "MAX_POOLS", "activation_constant", "max_pool_overlap"]

MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
MAX_POOLS_BY_DIM = (
    (nn.MaxPool1d, nn.AdaptiveMaxPool1d),
    (nn.MaxPool2d, nn.AdaptiveMaxPool2d),
    (nn.MaxPool3d, nn.AdaptiveMaxPool3d),
)
#: Lipschitz constants (sup of |derivative|) of parameter-free elementwise activations,
#: rounded up. Leaky ReLU and ELU depend on their slope (see :func:`activation_constant`).
ACTIVATION_LIPSCHITZ: dict[type, float] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Tanh: 1.0,
    nn.Hardtanh: 1.0,
    nn.Softsign: 1.0,
    nn.Sigmoid: 0.25,
    nn.Hardsigmoid: 1.0 / 6.0,
    nn.SiLU: 1.1,
    nn.GELU: 1.13,
    nn.Hardswish: 1.5,
}


def activation_constant(module: nn.Module) -> float | None:
    m, t = unwrap(module), base_type(module)
    if t is nn.LeakyReLU:
        return max(1.0, abs(float(m.negative_slope)))
    if t is nn.ELU:
        return max(1.0, abs(float(m.alpha)))  # the slope alpha e^x for x < 0 reaches |alpha|
    if t is nn.Hardtanh or t is nn.ReLU6:
        return 1.0
    return ACTIVATION_LIPSCHITZ.get(t)


def _windows(
    length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> list[list[int]]:
    """Input indices of every pooling window along one dimension (torch's output-size rule)."""
    span = dilation * (kernel - 1) + 1
    num = length + 2 * padding - span
    out = (math.ceil(num / stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return [
        [
            o * stride - padding + j * dilation
            for j in range(kernel)
            if 0 <= o * stride - padding + j * dilation < length
        ]
        for o in range(out)
    ]


def max_pool_overlap(pool: nn.Module, input_shape: Sequence[int]) -> int:
    """The largest number of pooling windows that contain one input position.

    ``|max_W(x) - max_W(y)| <= ||x_W - y_W||_2`` for every window W, so the max pool's
    L2 Lipschitz constant is at most ``sqrt`` of this count (and equals it: one input
    that is the maximum of all its windows moves that many outputs by its own change).

    >>> max_pool_overlap(nn.MaxPool2d(2), (3, 8, 8)), max_pool_overlap(nn.MaxPool2d(3, 2, 1), (3, 8, 8))
    (1, 4)
    """
    pool = unwrap(pool)
    # the pooled axes are the last 1, 2 or 3, whether or not a channel axis precedes them
    nd = next(d for d, types in enumerate(MAX_POOLS_BY_DIM, 1) if isinstance(pool, types))
    if len(input_shape) < nd:
        raise ValueError(
            f"{type(pool).__name__} needs at least {nd} dimensions, got input_shape {input_shape}"
        )
    spatial = [int(d) for d in input_shape[len(input_shape) - nd :]]

    def tup(v: Any) -> list[Any]:
        return [v] * nd if v is None or isinstance(v, int) else list(v)

    total = 1
    for d, length in enumerate(spatial):
        if isinstance(pool, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            size = tup(pool.output_size)[d]
            size = length if size is None else int(size)  # None keeps the input's size
            wins = [list(range((o * length) // size, -((-(o + 1) * length) // size))) for o in range(size)]
        else:
            k, s = (
                int(tup(pool.kernel_size)[d]),
                int(tup(pool.stride if pool.stride is not None else pool.kernel_size)[d]),
            )
            p, dil = int(tup(pool.padding)[d]), int(tup(pool.dilation)[d])
            wins = _windows(length, k, s, p, dil, bool(pool.ceil_mode))
        count = [0] * length
        for w in wins:
            for i in set(w):
                count[i] += 1
        total *= max(count) if count else 1
    return total
