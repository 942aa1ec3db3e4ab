"""The buffers :class:`fastclip.batched.BatchedTracker` steps every grouped wrapper in.

A plan (:func:`build_plan`) lays the vectors of every operator group
(:mod:`fastclip.wrapping.groups`) out in one flat buffer and their sigmas in another, and
makes each wrapper's ``vectors`` and ``sigma`` buffers views of them: ``state_dict`` and
the wrapper's own code see the usual tensors, while the normalisation and sigma of every
operator take a handful of ops in all (a segmented sum for the norms). The compositions'
BN scales ``s^2`` live in one buffer too, refreshed from the BN layers' state before each
pass (:func:`refresh_scales`). A plan holds while its wrappers' buffers, input shapes
and weights are the ones it made or saw (:func:`plan_is_current`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastclip.linalg.operator import unwrap
from fastclip.wrapping.groups import BN_LAYERS, OperatorGroup, bn_scales_squared, group_wrappers

if TYPE_CHECKING:  # annotations only
    from fastclip.wrapper import SpectralNorm

__all__ = ["build_plan", "plan_is_current", "refresh_scales"]


def plan_is_current(
    plan: dict[str, Any] | None, groups: list[OperatorGroup], wrappers: list[SpectralNorm]
) -> bool:
    """Whether ``plan`` (with its ``groups``) still holds for ``wrappers``: the same
    wrappers, whose buffers are still its views, at the same input shapes, with the same
    weight parameters, still shared as the groups stacked them."""
    p = plan
    return (
        p is not None
        and p["wrappers"] == wrappers
        and all(w.vectors is v and w.sigma is s for w, v, s in p["views"])
        and all(w.shape == shape for w, shape in p["shapes"])
        and all(layer.weight is weight for layer, weight in p["weights"])
        and all(g.Wt is None or g.Wt.data_ptr() == g.layers[0].weight.data_ptr() for g in groups)
        and all(g.shares_weights() for g in groups)
    )


def build_plan(
    wrappers: list[SpectralNorm], share_weights: bool = True
) -> tuple[list[OperatorGroup], dict[str, Any]] | None:
    """The groups of ``wrappers`` and the plan of their buffers (the wrappers' ``vectors``
    and ``sigma`` become views of it, their values copied), or None when there is nothing
    to batch: a wrapper that has not seen a batch yet (it starts itself in its forward),
    no group, or groups on different devices or dtypes. ``share_weights=False`` leaves
    the layers' weight storage alone (:attr:`OperatorGroup.shared`)."""
    if any(w.kind != "bn" and (w.vectors is None or w.shape is None) for w in wrappers):
        return None
    groups, rows_of = group_wrappers(wrappers)
    if not groups:
        return None
    dev, dt = groups[0].layers[0].weight.device, groups[0].layers[0].weight.dtype
    if any(g.layers[0].weight.device != dev or g.layers[0].weight.dtype != dt for g in groups):
        return None
    for g in groups:
        g.shared = share_weights
        g.share_weights()
    total = sum(g.rows * g.G * g.n for g in groups)
    flat = torch.empty(total, device=dev, dtype=dt)
    nvec = sum(g.rows * g.G for g in groups)
    sigma = torch.empty(nvec, device=dev, dtype=dt)
    lengths, views, shapes, batched, index = [], [], [], [], []
    bns: dict[int, tuple[nn.Module, int]] = {}  # BN -> its offset in the scales (after a leading 1)
    offset, vec, n_scales = 0, 0, 1
    where: dict[int, tuple[int, int, int]] = {}  # wrapper -> (group, row, layer)
    for gi, (g, rows) in enumerate(zip(groups, rows_of)):
        g.start = offset
        g.comp_rows = [any(bn is not None for _, bn in row) for row in rows]
        size = g.rows * g.G * g.n
        block = flat[offset : offset + size].view(g.rows, g.G, *g.in_shape)
        if g.kind == "conv":
            g.V = block.view(g.rows, g.G * g.in_shape[0], *g.in_shape[1:])
        elif g.G == 1:
            # detached: no autograd view of a parameter to outlive an in-place update
            g.V, g.Wt = block.view(g.rows, -1), g.layers[0].weight.detach().t()
        else:
            g.V = block
        for j, row in enumerate(rows):
            for i, (w, _) in enumerate(row):
                block[j, i].copy_(w.vectors[0].to(dt))
                w.vectors = block[j, i].unsqueeze(0)
                sigma[vec].copy_(w.sigma)
                w.sigma = sigma[vec]
                views.append((w, w.vectors, w.sigma))
                where[id(w)] = (gi, j, i)
                shapes.append((w, w.shape))
                batched.append(w)
                lengths.append(g.n)
                vec += 1
        if g.kind == "conv" and any(bn is not None for _, bn in rows[-1]):
            c_out = g.layers[0].out_channels
            start = len(index)
            for row in rows:
                for _, bn in row:
                    if bn is None:
                        index += [0] * c_out
                        continue
                    if id(bn) not in bns:
                        bns[id(bn)] = (bn, n_scales)
                        n_scales += bn.num_features
                    index += range(bns[id(bn)][1], bns[id(bn)][1] + c_out)
            g.M = (start, len(index))  # made a view of the scale buffer below
        offset += size
    M = torch.empty(len(index), device=dev, dtype=dt) if index else None
    for g in groups:
        if g.M is not None:
            a, b = g.M
            g.M = M[a:b].view(g.rows, -1, 1, 1)
    bn_wrappers = [w for w in wrappers if w.kind == "bn" and type(unwrap(w.module)) in BN_LAYERS]
    bn_wrappers = [w for w in bn_wrappers if unwrap(w.module).running_var is not None]
    bn_other = [w for w in wrappers if w.kind == "bn" and w not in bn_wrappers]
    pqr = {w.pqr_iter for w in wrappers if w.kind != "bn"}
    return groups, {
        "wrappers": wrappers,
        "views": views,
        "shapes": shapes,
        "batched": batched,
        "where": where,
        "flat": flat,
        "sigma": sigma,
        "lengths": torch.tensor(lengths, device=dev),
        # each element's vector (int32: the index is as long as the buffer)
        "segment": torch.repeat_interleave(
            torch.arange(len(lengths), device=dev, dtype=torch.int32),
            torch.tensor(lengths, device=dev),
            output_size=total,
        ),
        "weights": [(layer, layer.weight) for g in groups for layer in g.layers],
        "total": total,
        "bns": [bn for bn, _ in bns.values()],
        "M": M,
        "m_index": torch.tensor(index, device=dev, dtype=torch.long) if index else None,
        "one": torch.ones(1, device=dev, dtype=dt),
        "bn_wrappers": bn_wrappers,
        "bn_sigma": [w.sigma for w in bn_wrappers],
        "bn_other": bn_other,
        "steps": [w.step for w in wrappers],
        "pqr_iter": pqr.pop() if pqr else 0,
    }


def refresh_scales(plan: dict[str, Any]) -> None:
    """The compositions' BN scales ``s^2`` (the plan's scale buffer) from the BN layers'
    current state."""
    if plan["M"] is not None:
        s2 = bn_scales_squared(plan["bns"])
        torch.index_select(torch.cat([plan["one"], *s2]), 0, plan["m_index"], out=plan["M"])
