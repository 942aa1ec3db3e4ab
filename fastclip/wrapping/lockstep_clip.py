"""The clip step of every due wrapper of a :class:`fastclip.batched.BatchedTracker` with
its estimates made together, in lockstep (on a GPU, :data:`LOCKSTEP_CLIPS`).

The clips run in two phases (:meth:`LockstepClips.clip_due_`): first the convs and
linears (with the layers inside a due composition, which its own clip would start with),
then the compositions. Each wrapper's :meth:`fastclip.wrapping.clip_step.ClipStep.run`
makes its own decisions (rescale, fit rounds, the 1.01 c band) while the estimates its
rounds ask for are made together: one :func:`fastclip.linalg.lockstep.lanczos_many` per
round over the rows of the operator groups (:mod:`fastclip.wrapping.groups`) they are
in. A pass of all of them is one grouped convolution per row and a fixed handful of ops
for the basis, where the per-layer estimates cost ~75 ops per pass per layer. A wrapper
no group takes clips alone, as its own ``clip_`` would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fastclip.linalg.lockstep import FlatLayout, lanczos_many
from fastclip.linalg.operator import unwrap
from fastclip.spectral import SpectralResult, _round_to, default_check_every
from fastclip.wrapping.clip_step import _FAR_ABOVE, _FINISH, ClipStep, Measure, drive
from fastclip.wrapping.groups import OperatorGroup
from fastclip.wrapping.tracking_plan import refresh_scales

if TYPE_CHECKING:  # annotations only
    from fastclip.wrapper import SpectralNorm

__all__ = ["LOCKSTEP_CLIPS", "LockstepClips", "lockstep_clips"]

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


class LockstepClips:
    """The lockstep clip step of a tracker (:class:`fastclip.batched.BatchedTracker`, which
    builds the operator ``groups`` and the buffer plan ``_plan`` this step reads)."""

    groups: list[OperatorGroup]
    _plan: dict[str, Any] | None

    def clip_due_(self, wrappers: list[SpectralNorm]) -> None:
        """This step's due clips, the estimates of all of them made together: first the
        convs and linears (with the layers inside a due composition, which its own clip
        would start with), then the compositions. Each wrapper's
        :meth:`fastclip.wrapping.clip_step.ClipStep.run` makes its decisions; the estimates its
        rounds ask for are made in lockstep (:func:`fastclip.linalg.lockstep.lanczos_many`) over
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
        refresh_scales(p)

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
            max_passes=_FINISH * cfg.refine_iter,
            budget=cfg.refine_iter,
            budget_above=[per_op[k][1].band if k in per_op else None for k in range(n_ops)],
            min_passes=max(1, cfg.refine_iter // 3),
            floor=c,
            above=[
                _FAR_ABOVE * c[k] if k in per_op and per_op[k][1].band is not None else None
                for k in range(n_ops)
            ],
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
