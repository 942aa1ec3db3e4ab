"""A Lipschitz report for a model: every layer's exact sigma_1 and, where the
architecture allows it, an upper bound on the network's L2 Lipschitz constant.

:func:`lipschitz_report` runs one eval-mode dummy batch through the model with forward
hooks on every submodule, which record each layer's true input shape and which conv
output feeds a batch norm directly (a Conv+BN composition, found from the tensors
themselves, not from attribute names). Every linear layer - conv (any stride, groups,
dilation), transposed conv, linear, batch norm, the input normalisation inside the model,
average pooling - and every Conv+BN composition is measured with
:func:`fastclip.singular_values` (block Lanczos to convergence, float64; closed forms for
BN and ``nn.Linear``).

The network bound composes the measured norms along the model's known structure:

* a chain (``nn.Sequential``, torchvision's ResNet / VGG / MobileNetV2, which are chains of
  blocks, and any type given a :class:`Chain` rule by :func:`register_bound_rule`, as the
  pipeline's SimpleConv and ResNet are): the product; a conv feeding a
  batch norm enters as the composition's norm (at most the product of the two);
* a residual block (a :class:`Residual` rule, torchvision's ``BasicBlock`` / ``Bottleneck`` /
  ``InvertedResidual``): ``sigma(shortcut) + sigma(branch)`` (halved where the block
  averages), the identity shortcut counting 1;
* activations by their Lipschitz constants (ReLU, ReLU6, tanh, hardtanh: 1; sigmoid 1/4;
  leaky ReLU / ELU max(1, slope); SiLU 1.1, GELU 1.13, hardswish 1.5 (upper bounds of the
  derivative));
* max pooling: ``sqrt(w)`` where w is the largest number of pooling windows one input
  belongs to (1 for non-overlapping windows, 2 for torchvision ResNet's 3x3 stride-2 stem
  pool: a pixel that is the maximum of 4 windows moves 4 outputs);
* average pooling is linear and is measured like a layer (``1/k`` for a non-overlapping
  ``k x k`` pool, ``1/sqrt(HW)`` for global average pooling; an adaptive pool that
  upsamples replicates its input and has a norm above 1, which the measurement shows).

Anything else - a DLA tree (concatenations and aggregation nodes), attention, a
squeeze-excitation product, any module of an unknown type - gets the per-layer table and a
one-line reason instead of a network bound: the report never guesses a number.

Example::

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    >>> rep = lipschitz_report(net, (1, 6, 6))
    >>> [r.kind for r in rep.rows]
    ['conv', 'bn', 'conv+bn', 'linear']
    >>> abs(rep.bound - rep.rows[2].sigma1 * rep.rows[3].sigma1) < 1e-12
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastclip.analysis.discovery import base_type, canonical_layer_name, outermost_name, trace_layers
from fastclip.analysis.nonlinear import (
    ACTIVATION_LIPSCHITZ,
    MAX_POOLS,
    activation_constant,
    max_pool_overlap,
)
from fastclip.analysis.table import LayerNorm, LipschitzReport
from fastclip.linalg.operator import BN_TYPES, CONV_TYPES, eval_mode, unwrap
from fastclip.spectral import singular_values

__all__ = [
    "LayerNorm",
    "LipschitzReport",
    "lipschitz_report",
    "ACTIVATION_LIPSCHITZ",
    "max_pool_overlap",
    "Chain",
    "Residual",
    "register_bound_rule",
    "register_linear_layer",
]

_AVG = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
#: Maps that are the identity in eval mode.
_IDENTITY = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


@dataclass(frozen=True)
class Chain:
    """A forward that is the composition of ``modules`` in order: its bound is their product."""

    modules: Sequence[nn.Module]


@dataclass(frozen=True)
class Residual:
    """A forward ``after(scale * (shortcut(x) + branch(x)))`` where ``branch`` is a chain
    (``shortcut`` None: the identity; ``after`` None: nothing after the sum)."""

    branch: Sequence[nn.Module]
    shortcut: nn.Module | None = None
    scale: float = 1.0
    after: nn.Module | None = None


#: Bound rules for module types whose forward is a chain or a residual block of their
#: children, by exact type (see :func:`register_bound_rule`).
_RULES: dict[type, Callable[[Any], Chain | Residual]] = {}
#: Module types measured as one affine operator besides conv, linear, BN and average pool.
_LINEAR_KINDS: dict[type, str] = {}


def register_bound_rule(cls: type[nn.Module], rule: Callable[[Any], Chain | Residual]) -> None:
    """Teach :func:`lipschitz_report` the forward of ``cls``: ``rule(module)`` returns a
    :class:`Chain` or a :class:`Residual` of the module's children, exactly as its forward
    calls them (a child missing from the rule makes the report refuse a bound, never ignore
    the child). Rules match the exact type, so a subclass with another forward is not
    bounded by its parent's rule.

    Example::

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()
        ...     def forward(self, x):
        ...         return x + self.act(self.conv(x))
        >>> register_bound_rule(Block, lambda m: Residual([m.conv, m.act]))
        >>> rep = lipschitz_report(Block(), (2, 5, 5))
        >>> abs(rep.bound - (1 + rep.rows[0].sigma1)) < 1e-12
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _RULES[cls] = rule


def register_linear_layer(cls: type[nn.Module], kind: str) -> None:
    """Measure modules of type ``cls`` (an affine map, e.g. an input normalisation) as one
    operator, listed in the report's rows under ``kind``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _LINEAR_KINDS[cls] = str(kind)


class _NoBound(Exception):
    """The model has a part without a bound rule; the message is the one-line reason."""


def _is_sequential(module: nn.Module) -> bool:
    m = unwrap(module)
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _measured_kind(module: nn.Module) -> str | None:
    """The kind of a layer measured as a linear operator, or None."""
    t = base_type(module)
    if issubclass(t, CONV_TYPES):
        return "conv"
    if issubclass(t, nn.Linear):
        return "linear"
    if issubclass(t, BN_TYPES):
        return "bn"
    if t in _LINEAR_KINDS:
        return _LINEAR_KINDS[t]
    if issubclass(t, _AVG):
        return "avgpool"
    return None


Shape = tuple[int, ...]


class _Walker:
    """Turns the model's structure into a bound expression on layer names.

    It follows the calls the forward makes: every visit of a layer takes that layer's next
    call from the trace (its input shape there), so a module used twice counts twice, each
    at the size it sees; at the end every call of every leaf must have been visited."""

    def __init__(
        self,
        names: dict[int, str],
        calls: dict[str, list[Shape]],
        pairs: dict[str, str],
        sigma: dict[tuple[str, Shape], float],
        measure,
        out_shapes: dict[str, Shape],
    ):
        self.names, self.calls, self.pairs, self.sigma = names, calls, pairs, sigma
        self.measure, self.out_shapes = measure, out_shapes
        self.uses: dict[tuple[str, Shape], str] = {}
        self.visits: dict[str, int] = {}
        self.consts: list[LayerNorm] = []

    def name(self, module: nn.Module) -> str:
        return self.names[id(module)]

    def next_call(self, name: str) -> Shape:
        """The input shape of ``name``'s next call, in forward order."""
        calls = self.calls.get(name, [])
        i = self.visits.get(name, 0)
        if i >= len(calls):
            raise _NoBound(
                f"layer {name} is called {len(calls)} time(s) in the forward pass but the bound "
                "rule places it more often"
            )
        self.visits[name] = i + 1
        return calls[i]

    # An expression is a list of product terms; each term is (value, text).
    def product(self, modules: Sequence[nn.Module], ctx: str) -> tuple[float, str]:
        value, texts = 1.0, []
        flat: list[nn.Module] = []
        for m in modules:
            if _is_sequential(m):
                flat.extend(iter(unwrap(m)))  # as its forward: a module listed twice runs twice
            else:
                flat.append(m)
        if any(_is_sequential(m) for m in flat):
            return self.product(flat, ctx)
        i = 0
        while i < len(flat):
            m = flat[i]
            nm = self.names.get(id(m))
            nxt = self.names.get(id(flat[i + 1])) if i + 1 < len(flat) else None
            if nm is not None and nxt is not None and self.pairs.get(nm) == nxt:
                comp = f"{nm}+{nxt}"
                shape = self.next_call(nm)
                self.next_call(nxt)
                self.uses[(comp, shape)] = ctx
                self.uses.setdefault((nm, shape), f"in {comp}")
                self.uses.setdefault((nxt, self.calls[nxt][self.visits[nxt] - 1]), f"in {comp}")
                v, t = self.sigma[(comp, shape)], f"sigma({comp})"
                i += 2
            else:
                v, t = self.term(m, ctx)
                i += 1
            value *= v
            if t:
                texts.append(t)
        return value, " * ".join(texts) if texts else "1"

    def term(self, module: nn.Module, ctx: str) -> tuple[float, str]:
        name = self.names.get(id(module), "?")
        if name not in self.calls:
            raise _NoBound(
                f"layer {name} ({type(module).__name__}) is not called in the forward pass "
                "(its place in the network is unknown)"
            )
        if _is_sequential(module):
            return self.product([module], ctx)
        kind = _measured_kind(module)
        t = base_type(module)
        if kind is not None:
            shape = self.next_call(name)
            self.uses[(name, shape)] = ctx
            return self.sigma[(name, shape)], f"sigma({name})"
        if issubclass(t, _IDENTITY):
            self.next_call(name)
            return 1.0, ""
        c = activation_constant(module)
        if c is not None:
            shape = self.next_call(name)
            if c != 1.0:
                self.consts.append(LayerNorm(name, "activation", shape, c, ctx))
                return c, f"{c:g}"
            return 1.0, ""
        if issubclass(t, MAX_POOLS):
            shape = self.next_call(name)
            c = math.sqrt(max_pool_overlap(module, shape))
            self.consts.append(LayerNorm(name, "maxpool", shape, c, ctx))
            return c, f"{c:g}" if c != 1.0 else ""
        return self.block(module, name, ctx)

    def unplaced(self, leaves: dict[str, nn.Module]) -> str | None:
        """The first leaf layer whose calls the bound did not all place, as a reason."""
        for name, calls in self.calls.items():
            if name in leaves and issubclass(base_type(leaves[name]), _IDENTITY):
                continue  # (the identity in eval mode: where it sits does not change the bound)
            if name in leaves and self.visits.get(name, 0) != len(calls):
                return (
                    f"layer {name} is called {len(calls)} time(s) in the forward pass but the bound "
                    f"rule places it {self.visits.get(name, 0)} time(s)"
                )
        return None

    def residual(
        self,
        name: str,
        branch: Sequence[nn.Module],
        shortcut: nn.Module | None,
        scale: float = 1.0,
        after: nn.Module | None = None,
    ) -> tuple[float, str]:
        """``after(scale * (shortcut(x) + branch(x)))``: ``L(after) * scale * (L_s + L_b)``."""
        vb, tb = self.product(branch, f"block {name}: branch")
        vs, ts = (1.0, "1") if shortcut is None else self.product([shortcut], f"block {name}: shortcut")
        text = f"({ts} + {tb})" if scale == 1.0 else f"{scale:g} ({ts} + {tb})"
        va, ta = (1.0, "") if after is None else self.product([after], f"block {name}: after the sum")
        return va * scale * (vs + vb), text if ta in ("", "1") else f"{ta} * {text}"

    def block(self, module: nn.Module, name: str, ctx: str) -> tuple[float, str]:
        m = unwrap(module)
        t = type(m)
        tv = _torchvision_types()
        rule = _RULES.get(t)
        if rule is not None:
            shape = rule(m)
            if isinstance(shape, Residual):
                return self.residual(name, shape.branch, shape.shortcut, shape.scale, shape.after)
            return self.product(shape.modules, ctx)
        # torchvision's blocks call their one ``relu`` module inside the branch and after the sum
        if t is tv.get("BasicBlock"):
            return self.residual(name, [m.conv1, m.bn1, m.relu, m.conv2, m.bn2], m.downsample, after=m.relu)
        if t is tv.get("Bottleneck"):
            return self.residual(
                name,
                [m.conv1, m.bn1, m.relu, m.conv2, m.bn2, m.relu, m.conv3, m.bn3],
                m.downsample,
                after=m.relu,
            )
        if t is tv.get("InvertedResidual"):
            if m.use_res_connect:
                return self.residual(name, [m.conv], None)
            return self.product([m.conv], ctx)
        if t is tv.get("ResNet"):
            return self.product(
                [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4, m.avgpool, m.fc],
                ctx,
            )
        if t is tv.get("VGG"):
            return self.product([m.features, m.avgpool, m.classifier], ctx)
        if t is tv.get("MobileNetV2"):
            vf, tf = self.product([m.features], ctx)
            feat = self.name(m.features)
            pool = f"{name + '.' if name else ''}(adaptive_avg_pool2d)"
            key = (pool, self.out_shapes[feat])
            if key not in self.sigma:
                self.sigma[key] = self.measure(nn.AdaptiveAvgPool2d((1, 1)), self.out_shapes[feat])
                self.consts.append(LayerNorm(pool, "avgpool", self.out_shapes[feat], self.sigma[key], ctx))
            vc, tc = self.product([m.classifier], ctx)
            return vf * self.sigma[key] * vc, f"{tf} * sigma({pool}) * {tc}"
        what = f"{t.__module__}.{t.__name__}"
        if t.__name__ in ("Tree", "Root", "DLA"):
            raise _NoBound(
                f"{name or 'the model'} is a DLA aggregation tree ({t.__name__}): its outputs are "
                "concatenated across depths, which has no product or residual rule here"
            )
        if (
            any(isinstance(x, nn.MultiheadAttention) for x in m.modules())
            or "attention" in t.__name__.lower()
        ):
            raise _NoBound(
                f"{name or 'the model'} is an attention layer ({t.__name__}): softmax attention is not "
                "globally Lipschitz"
            )
        params = sum(p.numel() for p in m.parameters())
        raise _NoBound(
            f"{name or 'the model'} is a {what} (with {params} parameters): no bound rule for its forward"
        )


def _torchvision_types() -> dict[str, type]:
    try:
        # Lazy: torchvision.models is only needed for a torchvision model, and its
        # import (every architecture module) is slow.
        from torchvision.models import mobilenetv2, resnet, vgg
    except ImportError:  # pragma: no cover - torchvision is a requirement
        return {}
    return {
        "BasicBlock": resnet.BasicBlock,
        "Bottleneck": resnet.Bottleneck,
        "ResNet": resnet.ResNet,
        "VGG": vgg.VGG,
        "MobileNetV2": mobilenetv2.MobileNetV2,
        "InvertedResidual": mobilenetv2.InvertedResidual,
    }


def lipschitz_report(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
    name: str | None = None,
) -> LipschitzReport:
    """Measure every conv, linear, BN, input normalisation, average pool and Conv+BN
    composition of ``model`` at its true input size and bound the network's L2
    Lipschitz constant (see the module docstring for the rules).

    Args:
        model: any module taking a batch of ``input_shape`` inputs; evaluated in eval
            mode (batch norm with its running statistics); its parameters, buffers and
            train/eval flags are left as they were.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        dtype, tol: precision and relative tolerance of the extraction
            (:func:`fastclip.singular_values`; default float64, the library's tol).
        name: the model's name in the report (default: its class name).

    Returns a :class:`LipschitzReport`: ``rows`` in forward order, ``bound`` (None, with
    ``reason``, where no rule applies) and ``formula``.
    """
    try:
        input_shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be a sequence of ints (no batch dimension), got {input_shape!r}"
        ) from None
    if not input_shape or any(d <= 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be non-empty positive sizes (no batch dimension), got {input_shape}"
        )
    # Measured in eval mode (batch norm with its running statistics, parametrizations
    # without their training-time updates); whatever a forward still changes is put back.
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        with eval_mode(model):
            return _report(model, input_shape, dtype, tol, name)
    finally:
        with torch.no_grad():
            for b, value in saved:
                if not torch.equal(b, value):
                    b.copy_(value)


def _is_leaf(module: nn.Module) -> bool:
    """A layer the walker handles itself (not a container it recurses into)."""
    t = base_type(module)
    return (
        _measured_kind(module) is not None
        or issubclass(t, _IDENTITY + MAX_POOLS)
        or activation_constant(module) is not None
        or next(unwrap(module).children(), None) is None
    )


def _report(
    model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype, tol: float | None, name: str | None
) -> LipschitzReport:
    trace = trace_layers(model, input_shape)
    modules, order, pairs = trace.modules, trace.order, trace.pairs

    def measure(mod: nn.Module, shape: tuple[int, ...]) -> float:
        return float(singular_values(mod, shape, k=1, dtype=dtype, tol=tol)[0])

    canon = {nm: canonical_layer_name(nm, modules) for nm in order}
    rows: list[LayerNorm] = []
    sigma: dict[tuple[str, Shape], float] = {}
    for nm in order:
        mod = modules[nm]
        kind = _measured_kind(mod)
        if kind is None:
            continue
        for shape in dict.fromkeys(trace.calls[nm]):  # each size it is called at, once
            sigma[(canon[nm], shape)] = measure(mod, shape)
            rows.append(LayerNorm(canon[nm], kind, shape, sigma[(canon[nm], shape)]))
        if nm in pairs.values():
            conv = next(c for c, b in pairs.items() if b == nm)
            comp = f"{canon[conv]}+{canon[nm]}"
            for shape in dict.fromkeys(trace.calls[conv]):
                sigma[(comp, shape)] = measure(nn.Sequential(modules[conv], mod), shape)
                rows.append(LayerNorm(comp, "conv+bn", shape, sigma[(comp, shape)]))
    # The walker addresses layers by their hooked (outermost) names, canonicalised.
    names = {id(modules[nm]): canon[nm] for nm in order}
    for nm, mod in modules.items():  # inner modules of wrappers resolve to the wrapper's name
        names.setdefault(id(mod), canonical_layer_name(outermost_name(nm, modules), modules))
    cpairs = {canon[c]: canon[b] for c, b in pairs.items()}
    ccalls = {canon[nm]: list(c) for nm, c in trace.calls.items()}
    couts = {canon[nm]: s for nm, s in trace.out_shapes.items()}
    walker = _Walker(names, ccalls, cpairs, sigma, measure, couts)
    report = LipschitzReport(model=name or type(unwrap(model)).__name__, input_shape=input_shape)
    names[id(model)] = ""
    ccalls.setdefault("", [input_shape])
    leaves = {canon[nm]: modules[nm] for nm in order if _is_leaf(modules[nm])}
    try:
        value, formula = walker.term(model, "product")
        problem = walker.unplaced(leaves)
        if problem:
            # a call the rule did not place: the bound would ignore it
            raise _NoBound(f"{problem} (in {report.model})")
        report.bound, report.formula = float(value), formula
        for r in rows:
            r.bound = walker.uses.get((r.layer, r.input_shape), "-")
        seen = {(r.layer, r.input_shape) for r in rows}
        for c in walker.consts:  # a module called several times with one shape is listed once
            if (c.layer, c.input_shape) not in seen:
                seen.add((c.layer, c.input_shape))
                rows.append(c)
    except _NoBound as e:
        report.bound, report.formula, report.reason = None, "", str(e)
        for r in rows:
            r.bound = "-"
    report.rows = _forward_order(rows, order, canon)
    return report


def _forward_order(rows: list[LayerNorm], order: list[str], canon: dict[str, str]) -> list[LayerNorm]:
    rank = {canon[nm]: i for i, nm in enumerate(order)}

    def key(r: LayerNorm) -> float:
        if r.kind == "conv+bn":  # right after its batch norm
            return rank.get(r.layer.split("+")[-1], len(rank)) + 0.5
        return rank.get(r.layer, len(rank))

    return sorted(rows, key=key)
