"""Model registry: ``get_model(name, ...)`` builds SimpleConv, ResNet18 or DLA.

Every model starts with ``model.normalize`` (so it takes pixels in [0, 1]) and builds
each conv that is followed by a batch norm as a :class:`~fastclip.models.layers.ConvBN`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from fastclip.models.dla import DLA
from fastclip.models.layers import ConvBN, Normalize
from fastclip.models.resnet import ResNet18
from fastclip.models.simple_conv import SimpleConv

__all__ = ["MODELS", "available", "get_model", "ConvBN", "Normalize", "SimpleConv", "ResNet18", "DLA"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "SimpleConv": SimpleConv,
    "ResNet18": ResNet18,
    "DLA": DLA,
}


def available() -> list[str]:
    """Names accepted by :func:`get_model` (and by ``--model``)."""
    return list(MODELS)


def get_model(name: str, *, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, bn: bool = True,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              halve_shortcut: bool = False) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``input_size`` x ``input_size`` inputs in [0, 1].

    The first layer computes ``(x - mean) / std`` per channel (identity by default);
    ``bn=False`` builds the model without any batch norm; ``halve_shortcut`` (ResNet18
    only) averages instead of sums a block's output and its conv shortcut.

    Example::

        >>> m = get_model("SimpleConv", in_channels=1, input_size=28, mean=(0.2860,), std=(0.3530,))
        >>> type(m).__name__, round(m.normalize.std.item(), 4)
        ('SimpleConv', 0.353)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    factory = MODELS[name]
    kwargs = dict(in_channels=in_channels, num_classes=num_classes, input_size=input_size, bn=bn,
                  mean=mean, std=std)
    if "halve_shortcut" in inspect.signature(factory).parameters:
        kwargs["halve_shortcut"] = halve_shortcut
    elif halve_shortcut:
        raise ValueError(f"model {name!r} has no halve_shortcut option; it exists for "
                         f"{', '.join(n for n, f in MODELS.items() if 'halve_shortcut' in inspect.signature(f).parameters)}")
    return factory(**kwargs)
