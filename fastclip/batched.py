"""Every :class:`fastclip.SpectralNorm` wrapper of a model stepped at once: the per-step
PowerQR iteration in a few large ops instead of a chain of small ones per layer.

Per layer, a training step's tracking is one warm-started PowerQR iteration on one
vector, ``v <- (v + A^T A v) / ||v + A^T A v||``, ``sigma = sqrt(| ||v + A^T A v|| - 1 |)``:
about 15 small ops for each of the ~40 operators of a ResNet18, which on a GPU are ~15
kernel launches each whatever their size. :class:`BatchedTracker` runs it for all of
them together:

* operators that start with the same conv signature (weight shape, stride, padding,
  padding mode, dilation, groups, input shape) form a *group*: their G weights are
  stacked (once: the layers' weight parameters become views of the stack, so no step
  copies them) and the group's vectors pass as one grouped convolution (``groups = G *
  groups`` on a ``G * c_in``-channel input); a Conv+BN composition shares its conv's
  pass (its rows are scaled by BN's ``s^2`` between the forward and the adjoint, ``A^T A
  = A_conv^T D^2 A_conv``), and the adjoint is one ``convolution_backward`` (autograd
  through the padding for non-zero padding modes); linear layers of one shape go
  through one (batched) matmul;
* every vector lives in one flat buffer (each wrapper's ``vectors`` buffer is a view of
  it, so ``state_dict`` and the wrapper's own code see the usual tensors), so the
  normalisation and sigma of every operator take a handful of ops in all (a segmented
  sum for the norms), and every wrapper's ``sigma`` is a view of one buffer too;
* batch-norm wrappers' closed-form sigma_1 and every wrapper's step counter are
  ``torch._foreach_*`` ops over all of them.

The wrappers' schedules run per wrapper, on the host, in module order, before the
model's forward (refinement of a wrapper no group takes, the log); each wrapper's
forward then passes through. At a clip step on a GPU (:data:`LOCKSTEP_CLIPS`) the
clips of every due wrapper run together (:meth:`BatchedTracker.clip_due_`): first the convs and linears (with the
layers inside a due composition), then the compositions, each wrapper's
:meth:`fastclip.clip_step.ClipStep.run` making its own decisions (rescale, fit rounds,
the 1.01 c band) while the estimates its rounds ask for are made in lockstep, one
:func:`fastclip.lockstep.lanczos_many` per round over the rows of the groups they are
in: a pass of all of them is one grouped convolution per row and a fixed handful of
ops for the basis, where the per-layer estimates cost ~75 ops per pass per layer. Wrappers that do not fit a
group (``k > 1``, a composition that is not Conv+BN, a custom layer) are stepped as
usual by their own ``refine_``. The result is the per-layer iteration's to rounding
(the tests hold it to 1e-4 relative). Nothing changes for a wrapper used alone: the
batching lives here and is attached by the ``fastclip`` method (:func:`attach`).

Example::

    >>> model = FastClip(mode="wBN").prepare(get_model("ResNet18"), (3, 32, 32))  # attached
    >>> tracker = attach(model)     # or by hand on a model with SpectralNorm wrappers
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.batchnorm import bn_singular_values
from fastclip.clip_step import _FAR_ABOVE, ClipStep, Measure, drive
from fastclip.lockstep import FlatLayout, lanczos_many
from fastclip.operator import full_precision, unwrap
from fastclip.spectral import SpectralResult, _round_to, default_check_every
from fastclip.wrapper import SpectralNorm

__all__ = ["LOCKSTEP_CLIPS", "BatchedTracker", "attach", "detach", "lockstep_clips", "tracker_of"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Whether a clip step's estimates are made together in lockstep, by device type
#: (:func:`lockstep_clips`). On a GPU every op is a kernel launch whatever its size, and
#: the lockstep makes a pass of all layers in a few dozen of them instead of ~75 per
#: layer. On a CPU an op costs its flops only, and the per-layer estimates, each
#: stopping at its own pass, do fewer (ResNet18 wBN, a clip step a period after the
#: last: 6.7 s per layer against 8.7 s in lockstep, 1 thread): there each wrapper clips
#: alone. The tests and ``benchmarks/op_counts.py`` set ``"cpu"`` to True to run (and
#: count) what a GPU runs.
LOCKSTEP_CLIPS = {"cpu": False, "default": True}


def lockstep_clips(device: torch.device | str) -> bool:
    """Whether clip steps on ``device`` make their estimates in lockstep (:data:`LOCKSTEP_CLIPS`)."""
    return LOCKSTEP_CLIPS.get(torch.device(device).type, LOCKSTEP_CLIPS["default"])


@dataclass
class _Group:
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
        return self.W

    def share_weights(self) -> None:
        """Make the G layers' weights views of one stacked tensor ``W`` (their values
        copied once; the parameters stay the same objects, so optimisers and in-place
        updates go on as before): the group's pass reads the stack without copying the
        weights every step."""
        if self.G == 1:
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
        return self.G == 1 or [m.weight.data_ptr() for m in self.layers] == self.ptrs

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


def _signature(op: Any) -> tuple | None:
    """(kind, first layer, key) of an operator the groups can take, else None."""
    factors = op._factors
    if not factors or len(factors) > 2:
        return None
    first = factors[0][0]
    if len(factors) == 2:
        bn = factors[1][0]
        if type(bn) not in _BN or bn.running_var is None:
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


class BatchedTracker:
    """Steps every wrapper of ``model`` at once before each training forward (see the
    module docstring). ``step()`` is what the forward pre-hook calls; ``groups`` lists the
    operator groups of the current plan (built at the first step where every wrapper has
    seen a batch, rebuilt when a wrapper's buffers were replaced)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.groups: list[_Group] = []
        self._plan: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> BatchedTracker:
        # a copied model (e.g. a float64 copy to measure) gets a tracker of its own,
        # whose plan is rebuilt from the copied wrappers at its first step
        return BatchedTracker(copy.deepcopy(self.model, memo))

    # -- plan ----------------------------------------------------------------------
    def _wrappers(self) -> list[SpectralNorm]:
        return [m for m in self.model.modules() if isinstance(m, SpectralNorm)]

    def _valid(self, wrappers: list[SpectralNorm]) -> bool:
        p = self._plan
        return (
            p is not None
            and p["wrappers"] == wrappers
            and all(w.vectors is v and w.sigma is s for w, v, s in p["views"])
            and all(w.shape == shape for w, shape in p["shapes"])
            and all(layer.weight is weight for layer, weight in p["weights"])
            and all(g.Wt is None or g.Wt.data_ptr() == g.layers[0].weight.data_ptr() for g in self.groups)
            and all(g.shares_weights() for g in self.groups)
        )

    def _build(self, wrappers: list[SpectralNorm]) -> dict[str, Any] | None:
        if any(w.kind != "bn" and (w.vectors is None or w.shape is None) for w in wrappers):
            return None  # a wrapper that has not seen a batch starts itself in its forward
        members: dict[tuple, dict[int, list[tuple[SpectralNorm, nn.Module | None]]]] = {}
        layers: dict[tuple, list[nn.Module]] = {}
        pqr = {w.pqr_iter for w in wrappers if w.kind != "bn"}
        for w in wrappers:
            if w.kind == "bn" or w.vectors.shape[0] != 1 or len(pqr) != 1:
                continue
            sig = _signature(w._operator(w.shape))
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
        # one group per (signature, row pattern): a plain row and/or one composition row
        groups: list[_Group] = []
        rows_of: list[list[list[tuple[SpectralNorm, nn.Module | None]]]] = []
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
                groups.append(_Group(kind=key[0], layers=ls, in_shape=in_shape, rows=len(pattern)))
                rows_of.append([[per_layer[id(layer)][j] for layer in ls] for j in order])
        if not groups:
            return None
        dev, dt = groups[0].layers[0].weight.device, groups[0].layers[0].weight.dtype
        if any(g.layers[0].weight.device != dev or g.layers[0].weight.dtype != dt for g in groups):
            return None
        for g in groups:
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
        bn_wrappers = [w for w in wrappers if w.kind == "bn" and type(unwrap(w.module)) in _BN]
        bn_wrappers = [w for w in bn_wrappers if unwrap(w.module).running_var is not None]
        bn_other = [w for w in wrappers if w.kind == "bn" and w not in bn_wrappers]
        self.groups = groups
        return {
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

    # -- the batched iteration -----------------------------------------------------
    @staticmethod
    def _bn_s2(bns: Sequence[nn.Module]) -> list[torch.Tensor]:
        """``gamma^2 / (running_var + eps)`` of each BN (its closed-form scale, squared)."""
        den = torch._foreach_add([b.running_var for b in bns], [b.eps for b in bns])
        gammas = [b.weight for b in bns if b.weight is not None]
        if len(gammas) == len(bns) and bns:
            return torch._foreach_div(torch._foreach_mul(gammas, gammas), den)
        return [
            (b.weight.square() if b.weight is not None else torch.ones_like(d)) / d for b, d in zip(bns, den)
        ]

    def _refresh_scales(self) -> None:
        """The compositions' BN scales ``s^2`` from the BN layers' current state."""
        p = self._plan
        if p["M"] is not None:
            s2 = self._bn_s2(p["bns"])
            torch.index_select(torch.cat([p["one"], *s2]), 0, p["m_index"], out=p["M"])

    def iterate(self) -> None:
        """One PowerQR iteration of every grouped operator (the wrappers' vectors and
        sigma buffers are views of the plan's buffers: updated in place)."""
        p = self._plan
        self._refresh_scales()
        Y = torch.cat([g.gram() for g in self.groups]).add_(p["flat"])
        # ||v + A^T A v|| >= ||v|| = 1 (A^T A is positive semi-definite): no zero to guard
        nrm = torch.segment_reduce(Y.square(), "sum", lengths=p["lengths"], unsafe=True).sqrt_()
        torch.sqrt(nrm.sub(1).abs_(), out=p["sigma"])
        torch.div(Y, nrm.index_select(0, p["segment"]), out=p["flat"])

    @torch.no_grad()
    def step(self) -> bool:
        """This training step of every wrapper, before the forward: the batched
        refinement (when any grouped wrapper's schedule wants one), the closed-form
        sigma_1 of the batch-norm wrappers, each wrapper's schedule (log, clip) in module
        order, the step counters. Returns False (and does nothing) while some wrapper
        has not seen a batch yet: the wrappers then step themselves."""
        wrappers = self._wrappers()
        if not wrappers:
            return False
        if not self._valid(wrappers):
            self._plan = self._build(wrappers)
        p = self._plan
        if p is None:
            return False
        with full_precision(p["flat"].device):
            batched = p["batched"]
            if any(w.schedule.track_due(w._logging()) for w in batched):
                for _ in range(p["pqr_iter"]):
                    self.iterate()
                for w in batched:
                    w._op.passes += p["pqr_iter"]
                for w in batched:
                    w.schedule.mark_tracked()
            if p["bn_wrappers"]:
                bns = [unwrap(w.module) for w in p["bn_wrappers"]]
                torch._foreach_copy_(p["bn_sigma"], torch._foreach_sqrt(torch._foreach_max(self._bn_s2(bns))))
            for w in p["bn_other"]:  # a batch norm the foreach ops do not take (e.g. SyncBatchNorm)
                w.sigma.copy_(bn_singular_values(unwrap(w.module), k=1)[0])
            for w in wrappers:
                w.step_driven_(finish=False)
            if lockstep_clips(p["flat"].device):
                self.clip_due_(wrappers)
            for w in wrappers:
                w.finish_step_()  # (the clips not made together: each wrapper's own)
            torch._foreach_add_(p["steps"], 1)
        return True

    # -- the batched clip step ---------------------------------------------------
    def clip_due_(self, wrappers: list[SpectralNorm]) -> None:
        """This step's due clips, the estimates of all of them made together: first the
        convs and linears (with the layers inside a due composition, which its own clip
        would start with), then the compositions. Each wrapper's
        :meth:`fastclip.clip_step.ClipStep.run` makes its decisions; the estimates its
        rounds ask for are made in lockstep (:func:`fastclip.lockstep.lanczos_many`) over
        the operator groups (one grouped convolution per layer signature and pass)."""
        due = [w for w in wrappers if w.schedule.clip_due()]
        if not due:
            return
        comps = [w for w in due if w.kind == "composition"]
        first = [w for w in due if w.kind != "composition"]
        for c in comps:
            for w in c.inner_wrappers():
                if (
                    w.clip_flag
                    and w.kind in ("conv", "linear")
                    and w.vectors is not None
                    and w not in first
                    and not w.schedule.clipped()
                ):
                    first.append(w)
        for phase in (first, comps):
            self._clip_together(phase)
            for w in phase:
                w.schedule.mark_clipped()

    def _clip_together(self, wrappers: list[SpectralNorm]) -> None:
        p = self._plan
        steps = {}
        for w in wrappers:
            st = w.clip_begin_()
            if st is not None:
                steps[w] = st
        # estimates made together share their settings (a layer too small for the block
        # size, e.g. a linear with 4 outputs, has its own): one lockstep per setting
        by_setting: dict[tuple, list[SpectralNorm]] = {}
        for w, st in steps.items():
            if id(w) in p["where"]:
                key = (st.cfg.refine_tol, st.cfg.refine_iter, st.cfg.k, st.block)
                by_setting.setdefault(key, []).append(w)
            else:  # clipped alone, as its own clip_ would
                drive(st.run(unwrap(w.module)), st.measure)
        for together in by_setting.values():
            self._run_together({w: steps[w] for w in together})

    def _run_together(self, steps: dict[SpectralNorm, ClipStep]) -> None:
        runs = {w: st.run(unwrap(w.module)) for w, st in steps.items()}
        requests = {}
        for w, run in runs.items():
            try:
                requests[w] = next(run)
            except StopIteration:
                pass
        while requests:
            results = self._measure_together(requests, steps)
            sent = {}
            for w, r in results.items():
                try:
                    sent[w] = runs[w].send(r)
                except StopIteration:
                    pass
            requests = sent

    def _measure_together(
        self, requests: dict[SpectralNorm, Measure], steps: dict[SpectralNorm, ClipStep]
    ) -> dict[SpectralNorm, SpectralResult]:
        """The estimates ``requests`` ask for (:meth:`ClipStep.measure`'s, made together):
        the groups' rows they are in iterate in lockstep, every layer of such a row
        riding along (one grouped convolution per row and pass)."""
        p = self._plan
        picked: dict[tuple[int, int], dict[int, SpectralNorm]] = {}
        for w in requests:
            gi, j, i = p["where"][id(w)]
            picked.setdefault((gi, j), {})[i] = w
        blocks = sorted(picked)
        sizes = [self.groups[gi].n for gi, _ in blocks for _ in range(self.groups[gi].G)]
        first = next(iter(steps.values()))
        dev, dt = p["flat"].device, p["flat"].dtype
        layout = FlatLayout(sizes, device=dev)
        if not layout.usable():
            return {w: steps[w].measure(q) for w, q in requests.items()}
        cfg = first.cfg
        b = first.block + 1  # the warm start's rows and a random one (ClipStep.measure)
        gen = torch.Generator(device=dev).manual_seed(first.w.schedule.step)
        start = torch.randn((b, layout.N), generator=gen, device=dev, dtype=dt)
        per_op: dict[int, tuple[SpectralNorm, Measure]] = {}  # op index -> (wrapper, request)
        k = 0
        firsts = []  # each block's first operator
        for gi, j in blocks:
            g = self.groups[gi]
            firsts.append(k)
            for i in range(g.G):
                w = picked[(gi, j)].get(i)
                if w is not None:
                    q = requests[w]
                    X = q.X.reshape(q.X.shape[0], -1)  # (at most block rows: ClipStep.request)
                    start[: X.shape[0], layout.offsets[k] : layout.offsets[k + 1]] = X
                    per_op[k] = (w, q)
                k += 1
        self._refresh_scales()

        scales = [
            self.groups[gi].M[j] if self.groups[gi].M is not None and self.groups[gi].comp_rows[j] else None
            for gi, j in blocks
        ]
        zeros: dict[int, torch.Tensor] = {}

        def gram(P: torch.Tensor, live: list[bool], present: list[int]) -> torch.Tensor:
            outs, a = [], 0
            for u in present:  # the blocks still in the basis, in order
                g, k0, M = self.groups[blocks[u][0]], firsts[u], scales[u]
                if not any(live[k0 : k0 + g.G]):  # every layer of the row has stopped
                    if u not in zeros:
                        zeros[u] = P.new_zeros((P.shape[0], g.G * g.n))
                    outs.append(zeros[u])
                else:
                    outs.append(g.gram_of(g.shaped(P[:, a : a + g.G * g.n]), M).view(P.shape[0], -1))
                a += g.G * g.n
            return torch.cat(outs, dim=1)

        n_ops = layout.n_ops
        c = [steps[per_op[k][0]].c if k in per_op else 1.0 for k in range(n_ops)]
        r = lanczos_many(
            gram,
            start,
            layout,
            k=cfg.k,
            tol=cfg.refine_tol,
            max_passes=cfg.refine_iter,
            min_passes=max(1, cfg.refine_iter // 3),
            floor=c,
            above=[_FAR_ABOVE * x for x in c],
            below=[per_op[k][1].stop_below if k in per_op else None for k in range(n_ops)],
            min_value=[None if k in per_op and steps[per_op[k][0]].linear else c[k] for k in range(n_ops)],
            active=[k in per_op for k in range(n_ops)],
            check_every=default_check_every(dev),
            units=[self.groups[gi].G for gi, _ in blocks],
        )
        out = {}
        for k, (w, _) in per_op.items():
            st = steps[w]
            values, right = r.values[k], r.vectors[k]  # max(k, count) of them (a linear: k)
            assert values is not None and right is not None  # (an active operator's)
            st.op.passes += r.passes[k]
            out[w] = SpectralResult(
                values=values.to(st.op.dtype),
                right=right.view(-1, *st.op.input_shape).to(st.op.dtype),
                left=None,
                passes=r.passes[k],
                converged=r.converged[k],
                top=_round_to(r.top[k], st.op.dtype),
            )
        return out

    def __call__(self, module: nn.Module, args: tuple) -> None:
        """The forward pre-hook: step in training mode on a tensor input."""
        if module.training and args and isinstance(args[0], torch.Tensor):
            self.step()


def attach(model: nn.Module) -> BatchedTracker:
    """A :class:`BatchedTracker` on ``model``'s wrappers, run by a forward pre-hook of
    ``model`` (once per model: a second call returns the first tracker)."""
    tracker = tracker_of(model)
    if tracker is None:
        tracker = BatchedTracker(model)
        model.register_forward_pre_hook(tracker)
    return tracker


def tracker_of(model: nn.Module) -> BatchedTracker | None:
    """The tracker :func:`attach` put on ``model``, if any."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, BatchedTracker):
            return hook
    return None


def detach(model: nn.Module) -> bool:
    """Remove the tracker :func:`attach` put on ``model`` (the wrappers then step
    themselves in their forwards, layer by layer, as the published wrapper does; their
    buffers stay valid). Returns whether there was one."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, BatchedTracker):
            del model._forward_pre_hooks[key]
            return True
    return False
