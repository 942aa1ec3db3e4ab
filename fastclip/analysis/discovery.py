"""Finding a model's layers: wrapper-free names, true input shapes, Conv+BN pairs.

Measurements and reports address a layer by the name it has in the unwrapped model
(``conv1.conv``, not ``conv1.module.conv.module``), so that a layer has the same name
whichever method trained it, and measure it at the input size it really sees in the
forward pass. Two tools give those:

* :func:`outermost_name` / :func:`canonical_layer_name` on ``dict(model.named_modules())``;
* :func:`trace_layers`: one eval-mode dummy batch with forward hooks on the outermost
  module of every layer, recording each input (and output) shape, the call order, and
  which conv output goes straight into a batch norm (a Conv+BN composition, found from
  the tensors themselves, not from attribute names).

Example::

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    >>> trace_layers(net, (1, 6, 6)).pairs
    {'0': '1'}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastclip.linalg.operator import BN_TYPES, CONV_TYPES, eval_mode, unwrap

__all__ = ["LayerTrace", "base_type", "canonical_layer_name", "is_wrapper", "outermost_name", "trace_layers"]


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`fastclip.SpectralNorm` wrapper (anything
    :func:`fastclip.linalg.operator.unwrap` looks through)."""
    return unwrap(module) is not module


def base_type(module: nn.Module) -> type:
    """The layer's class: wrappers looked through, a parametrised layer
    (torch.nn.utils.parametrize, e.g. Miyato's spectral_norm) counted as its original class."""
    module = unwrap(module)
    t = type(module)
    if parametrize.is_parametrized(module):
        t = t.__bases__[0]
    return t


def outermost_name(name: str, modules: dict[str, nn.Module]) -> str:
    """The name of the outermost SpectralNorm wrapper around ``name`` (or ``name``)."""
    while name:
        parent = name.rpartition(".")[0]
        if name.rpartition(".")[2] == "module" and parent in modules and is_wrapper(modules[parent]):
            name = parent
        else:
            break
    return name


def canonical_layer_name(name: str, modules: dict[str, nn.Module]) -> str:
    """``name`` without the ``.module`` steps of SpectralNorm wrappers, so a layer has the
    same name whichever method trained it (``conv1.conv.module`` -> ``conv1.conv``)."""
    parts, kept = name.split("."), []
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if part == "module" and i > 0 and prefix in modules and is_wrapper(modules[prefix]):
            continue
        kept.append(part)
    return ".".join(kept)


@dataclass
class LayerTrace:
    """What one dummy forward pass showed, by hooked (outermost) module name:
    ``shapes`` / ``out_shapes`` per-sample input / output shapes of the first call,
    ``calls`` the input shape of every call in call order (a module used twice, or at two
    sizes, has two), ``order`` the names in first-call order, ``pairs`` conv name -> the
    batch norm its output feeds directly, untouched in between (every call of that conv)."""

    modules: dict[str, nn.Module]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    pairs: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


def _is_conv(module: nn.Module) -> bool:
    return issubclass(base_type(module), CONV_TYPES)


def _is_bn(module: nn.Module) -> bool:
    return issubclass(base_type(module), BN_TYPES)


def _inside_parametrization(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether ``name`` is part of a parametrization (``<layer>.parametrizations.weight.0``):
    it computes the layer's weight, it is not a layer of the forward."""
    parts = name.split(".")
    return any(
        part == "parametrizations" and parametrize.is_parametrized(modules[".".join(parts[:i])])
        for i, part in enumerate(parts)
        if ".".join(parts[:i]) in modules
    )


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> LayerTrace:
    """Run one eval-mode batch of zeros of per-sample ``input_shape`` through ``model``
    with forward hooks on the outermost module of every layer (a SpectralNorm wrapper in
    eval mode is its layer) and return the :class:`LayerTrace`. The model's flags are
    restored; a shape that does not fit is one ``ValueError`` line."""
    input_shape = tuple(input_shape)
    modules = dict(model.named_modules())
    trace = LayerTrace(modules)
    # id(output) -> (conv name, output kept alive, its version when the conv returned it)
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}
    fed: dict[str, set[str | None]] = {}  # conv name -> what each of its outputs went into

    def hook(mod: nn.Module, args: tuple, out: object, nm: str) -> None:
        if not (args and isinstance(args[0], torch.Tensor)):
            return
        x = args[0]
        if nm not in trace.shapes:
            trace.shapes[nm] = tuple(x.shape[1:])
            trace.order.append(nm)
        trace.calls.setdefault(nm, []).append(tuple(x.shape[1:]))
        if isinstance(out, torch.Tensor):
            trace.out_shapes.setdefault(nm, tuple(out.shape[1:]))
        src = produced.get(id(x))
        # the same tensor, not changed in place since the conv made it (an in-place ReLU
        # between the two returns the same object with a higher version)
        if src is not None and src[1] is x and x._version == src[2]:
            if _is_bn(mod):
                fed[src[0]].add(nm)
            elif (
                next(mod.children(), None) is None
            ):  # another layer takes it (a container's first layer already said)
                fed[src[0]].add(None)
        if _is_conv(mod) and isinstance(out, torch.Tensor):
            produced[id(out)] = (nm, out, out._version)
            fed.setdefault(nm, set())

    hooks = [
        mod.register_forward_hook(lambda m, a, o, nm=nm: hook(m, a, o, nm))
        for nm, mod in modules.items()
        if outermost_name(nm, modules) == nm and not _inside_parametrization(nm, modules)
    ]
    p = next(model.parameters(), None)
    try:
        with torch.no_grad(), eval_mode(model):
            try:
                model(
                    torch.zeros(
                        (1, *input_shape),
                        device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None else None,
                    )
                )
            except Exception as e:  # noqa: BLE001 - one line with the shape that caused it
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(
                    f"input_shape {input_shape} does not fit {type(model).__name__}: {msg}"
                ) from None
    finally:
        for h in hooks:
            h.remove()
        produced.clear()
    for conv, into in fed.items():
        (bn,) = into if len(into) == 1 else (None,)
        # a pair only where every call of the conv went into that BN and nothing else took it first
        if bn is not None and len(trace.calls[conv]) == len(trace.calls.get(bn, [])):
            trace.pairs[conv] = bn
    return trace
