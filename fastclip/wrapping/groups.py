"""Operators that share a layer signature, passed together: the groups of
:class:`fastclip.batched.BatchedTracker`.

Operators that start with the same conv signature (weight shape, stride, padding, padding
mode, dilation, groups, input shape, dtype, device) form a group (:class:`OperatorGroup`):
their G weights are stacked once (the layers' weight parameters become views of the
stack) and the group's vectors pass as one grouped convolution (``groups = G * groups`` on
a ``G * c_in``-channel input). A Conv+BN composition shares its conv's pass as a second
row, its image scaled by BN's ``s^2`` between the forward and the adjoint (``A^T A =
A_conv^T D^2 A_conv``, :func:`bn_scales_squared`). Linear layers of one shape go through
one (batched) matmul. :func:`group_wrappers` sorts a model's wrappers into groups; a
wrapper no group takes (``k > 1``, a composition that is not Conv+BN, a custom layer)
steps itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only
    from fastclip.wrapper import SpectralNorm

__all__ = ["BN_LAYERS", "OperatorGroup", "bn_scales_squared", "group_wrappers", "signature"]

#: The batch norms a group's composition row takes (exact types: their closed-form scale).
BN_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: A group member: a wrapper and the BN of its Conv+BN composition (None for a plain layer).
Member = tuple["SpectralNorm", "nn.Module | None"]


@dataclass
class OperatorGroup:
    """Operators that share a layer signature: ``layers`` (G convs or linears), each with
    ``rows`` vectors (the layer's own, and a Conv+BN composition's, whose image ``M``
    scales by its BN's ``s^2`` between the forward and the adjoint)."""

    kind: str  # "conv" or "linear"
    layers: list[nn.Module]
    in_shape: tuple[int, ...]
    rows: int
    start: int = 0  # offset of the group's block in the flat buffer
    V: torch.Tensor | None = None  # (rows, G * c_in, H, W) view of the flat buffer
    M: torch.Tensor | None = None  # (rows, G * c_out, 1, 1) view of the scale buffer, or None
    Wt: torch.Tensor | None = None  # a single linear's weight, transposed (a view)
    W: torch.Tensor | None = None  # G > 1: the stacked weights, which the layers' weights are views of
    ptrs: list[int] | None = None
    comp_rows: list[bool] = field(default_factory=list)  # which rows are compositions
    # False: the layers' weights are left alone (a model the caller owns, e.g. under
    # torch.compile) and the group stacks them afresh at each pass instead
    shared: bool = True

    @property
    def G(self) -> int:
        return len(self.layers)

    @property
    def n(self) -> int:
        return math.prod(self.in_shape)

    def weight(self) -> torch.Tensor:
        if self.G == 1:
            # a linear's transposed weight: a view made once (the optimiser updates in place)
            return self.Wt if self.kind == "linear" else self.layers[0].weight
        if self.W is None:  # not shared: a fresh stack of the current weights
            weights = [m.weight.detach() for m in self.layers]
            return torch.stack(weights) if self.kind == "linear" else torch.cat(weights)
        return self.W

    def share_weights(self) -> None:
        """Make the G layers' weights views of one stacked tensor ``W`` (their values
        copied once; the parameters stay the same objects, so optimisers and in-place
        updates go on as before): the group's pass reads the stack without copying the
        weights every step."""
        if self.G == 1 or not self.shared:
            return
        weights = [m.weight.detach() for m in self.layers]
        self.W = torch.stack(weights) if self.kind == "linear" else torch.cat(weights)
        size = weights[0].shape[0]
        for i, m in enumerate(self.layers):
            m.weight.data = self.W[i] if self.kind == "linear" else self.W[i * size : (i + 1) * size]
        self.ptrs = [m.weight.data_ptr() for m in self.layers]

    def shares_weights(self) -> bool:
        """Whether the layers' weights are still the views :meth:`share_weights` made
        (``.to()``, ``param.data = ...`` or a load with ``assign=True`` replace them)."""
        return self.G == 1 or not self.shared or [m.weight.data_ptr() for m in self.layers] == self.ptrs

    def gram(self) -> torch.Tensor:
        """``A^T A v`` of every row of the group, flattened in the buffer's layout."""
        return self.gram_of(self.V, self.M)

    def shaped(self, P: torch.Tensor) -> torch.Tensor:
        """A block ``(b, G * n)`` of vectors (the group's layers side by side) in the shape
        :meth:`gram_of` takes (a view)."""
        if self.kind == "conv":
            return P.view(P.shape[0], self.G * self.in_shape[0], *self.in_shape[1:])
        return P if self.G == 1 else P.view(P.shape[0], self.G, -1)

    def gram_of(self, X: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
        """``A^T A x`` of every row of ``X`` (shaped as :attr:`V`), the image scaled by ``M``
        (BN's ``s^2`` per output channel, broadcast over the rows) between the forward and
        the adjoint; flattened row by row."""
        W = self.weight()
        rows = X.shape[0]
        if self.kind == "linear":
            if self.G == 1:
                return torch.mm(torch.mm(X, W), self.layers[0].weight).reshape(-1)
            X = X.view(rows, self.G, -1).transpose(0, 1)
            return torch.bmm(torch.bmm(X, W.transpose(1, 2)), W).transpose(0, 1).reshape(-1)
        conv = self.layers[0]
        groups = conv.groups * self.G
        if conv.padding_mode == "zeros":
            # one layer: its own forward (what the per-layer operator calls)
            Y = (
                conv._conv_forward(X, W, None)
                if self.G == 1
                else F.conv2d(X, W, None, conv.stride, conv.padding, conv.dilation, groups)
            )
            if M is not None:
                Y = Y * M
            g = torch.ops.aten.convolution_backward(
                Y,
                X,
                W,
                None,
                conv.stride,
                conv.padding,
                conv.dilation,
                False,
                [0, 0],
                groups,
                [True, False, False],
            )[0]
            return g.reshape(-1)  # (a copy only when the layer is channels-last)
        # a padding mode's adjoint (circular wrap, reflection) by autograd
        Xr = X.detach().requires_grad_(True)
        with torch.enable_grad():
            Y = F.conv2d(
                F.pad(Xr, conv._reversed_padding_repeated_twice, mode=conv.padding_mode),
                W,
                None,
                conv.stride,
                0,
                conv.dilation,
                groups,
            )
            (g,) = torch.autograd.grad(Y, Xr, grad_outputs=Y.detach() * M if M is not None else Y.detach())
        return g.reshape(-1)


def signature(op: Any) -> tuple | None:
    """(kind, first layer, key) of an operator the groups can take, else None."""
    factors = op._factors
    if not factors or len(factors) > 2:
        return None
    first = factors[0][0]
    if len(factors) == 2:
        bn = factors[1][0]
        if type(bn) not in BN_LAYERS or bn.running_var is None:
            return None
    if type(first) is nn.Conv2d and isinstance(first.padding, tuple):
        key = (
            "conv",
            tuple(first.weight.shape),
            first.stride,
            first.padding,
            first.dilation,
            first.groups,
            first.padding_mode,
            op.input_shape,
            first.weight.dtype,
            first.weight.device,
        )
        return "conv", first, key
    if type(first) is nn.Linear and len(op.input_shape) == 1 and len(factors) == 1:
        return "linear", first, ("linear", tuple(first.weight.shape), op.input_shape, first.weight.dtype)
    return None


def group_wrappers(wrappers: Sequence[SpectralNorm]) -> tuple[list[OperatorGroup], list[list[list[Member]]]]:
    """The groups ``wrappers`` form (one per signature and row pattern: a plain row and/or
    one composition row, the plain row first) and, for each group, its rows' members layer
    by layer. Wrappers whose tracking the groups cannot take are left out: batch norms,
    ``k > 1``, mixed ``pqr_iter`` settings, operators without a signature."""
    members: dict[tuple, dict[int, list[Member]]] = {}
    layers: dict[tuple, list[nn.Module]] = {}
    pqr = {w.pqr_iter for w in wrappers if w.kind != "bn"}
    for w in wrappers:
        if w.kind == "bn" or w.vectors.shape[0] != 1 or len(pqr) != 1:
            continue
        sig = signature(w._operator(w.shape))
        if sig is None:
            continue
        kind, first, key = sig
        op = w._op
        bn = op._factors[1][0] if len(op._factors) == 2 else None
        per_layer = members.setdefault(key, {})
        if id(first) not in per_layer:
            per_layer[id(first)] = []
            layers.setdefault(key, []).append(first)
        per_layer[id(first)].append((w, bn))
    groups: list[OperatorGroup] = []
    rows_of: list[list[list[Member]]] = []
    for key, per_layer in members.items():
        by_pattern: dict[tuple, list[nn.Module]] = {}
        for layer in layers[key]:
            ms = per_layer[id(layer)]
            pattern = tuple(bn is not None for _, bn in ms)
            if key[0] == "linear" and any(pattern) or len(pattern) > 2 or pattern.count(False) > 1:
                continue
            by_pattern.setdefault(pattern, []).append(layer)
        for pattern, ls in by_pattern.items():
            order = sorted(range(len(pattern)), key=lambda j: pattern[j])  # the plain row first
            in_shape = per_layer[id(ls[0])][0][0].shape
            groups.append(OperatorGroup(kind=key[0], layers=ls, in_shape=in_shape, rows=len(pattern)))
            rows_of.append([[per_layer[id(layer)][j] for layer in ls] for j in order])
    return groups, rows_of


def bn_scales_squared(bns: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``gamma^2 / (running_var + eps)`` of each BN (its closed-form scale, squared)."""
    den = torch._foreach_add([b.running_var for b in bns], [b.eps for b in bns])
    gammas = [b.weight for b in bns if b.weight is not None]
    if len(gammas) == len(bns) and bns:
        return torch._foreach_div(torch._foreach_mul(gammas, gammas), den)
    return [(b.weight.square() if b.weight is not None else torch.ones_like(d)) / d for b, d in zip(bns, den)]
