"""Model registry: ``get_model(name, ...)`` builds SimpleConv, ResNet18 or DLA.

Every model starts with ``model.normalize`` (so it takes pixels in [0, 1]) and builds
each conv that is followed by a batch norm as a :class:`~fastclip.pipeline.models.layers.ConvBN`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from fastclip.pipeline.models.dla import DLA
from fastclip.pipeline.models.layers import ConvBN, Normalize
from fastclip.pipeline.models.resnet import ResNet18
from fastclip.pipeline.models.simple_conv import SimpleConv

__all__ = [
    "MODELS",
    "available",
    "get_model",
    "model_options",
    "ConvBN",
    "Normalize",
    "SimpleConv",
    "ResNet18",
    "DLA",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "SimpleConv": SimpleConv,
    "ResNet18": ResNet18,
    "DLA": DLA,
}


#: Keyword arguments of the factories that every model takes (set from the dataset and mode).
_COMMON = frozenset(
    {"in_channels", "num_classes", "input_size", "bn", "mean", "std", "halve_shortcut", "width"}
)


def available() -> list[str]:
    """Names accepted by :func:`get_model` (and by ``--model``)."""
    return list(MODELS)


def model_options(name: str) -> dict[str, Any]:
    """The architecture options of model ``name`` beyond the common ones, with their
    defaults (SimpleConv: kernel_size, padding, stride, dilation, padding_mode).

    Example::

        >>> model_options("SimpleConv")["padding_mode"]
        'zeros'
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name not in _COMMON and p.default is not inspect.Parameter.empty
    }


def get_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    bn: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    halve_shortcut: bool = False,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``input_size`` x ``input_size`` inputs in [0, 1].

    The first layer computes ``(x - mean) / std`` per channel (identity by default);
    ``bn=False`` builds the model without any batch norm; ``halve_shortcut`` (ResNet18
    only) averages instead of sums a block's output and its conv shortcut; ``options``
    are the model's own architecture options (:func:`model_options`), e.g.
    ``{"kernel_size": 5, "padding_mode": "circular"}`` for SimpleConv.

    Example::

        >>> m = get_model("SimpleConv", in_channels=1, input_size=28, mean=(0.2860,), std=(0.3530,))
        >>> type(m).__name__, round(m.normalize.std.item(), 4)
        ('SimpleConv', 0.353)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    factory = MODELS[name]
    kwargs = dict(
        in_channels=in_channels, num_classes=num_classes, input_size=input_size, bn=bn, mean=mean, std=std
    )
    if "halve_shortcut" in inspect.signature(factory).parameters:
        kwargs["halve_shortcut"] = halve_shortcut
    elif halve_shortcut:
        raise ValueError(
            f"model {name!r} has no halve_shortcut option; it exists for "
            f"{', '.join(n for n, f in MODELS.items() if 'halve_shortcut' in inspect.signature(f).parameters)}"
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(model_options(name)))
    if unknown:
        have = ", ".join(model_options(name)) or "none"
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; its options: {have}")
    return factory(**kwargs, **options)
