"""Every :class:`fastclip.SpectralNorm` wrapper of a model stepped at once: the per-step
PowerQR iteration in a few large ops instead of a chain of small ones per layer.

Per layer, a training step's tracking is one warm-started PowerQR iteration on one
vector, ``v <- (v + A^T A v) / ||v + A^T A v||``, ``sigma = sqrt(| ||v + A^T A v|| - 1 |)``:
about 15 small ops for each of the ~40 operators of a ResNet18, which on a GPU are ~15
kernel launches each whatever their size. :class:`BatchedTracker` runs it for all of
them together:

* operators that start with the same conv signature (weight shape, stride, padding,
  padding mode, dilation, groups, input shape) form a *group*
  (:mod:`fastclip.wrapping.groups`): their G weights are stacked (once: the layers'
  weight parameters become views of the stack, so no step copies them) and the group's
  vectors pass as one grouped convolution (``groups = G * groups`` on a ``G *
  c_in``-channel input); a Conv+BN composition shares its conv's pass (its rows are
  scaled by BN's ``s^2`` between the forward and the adjoint, ``A^T A = A_conv^T D^2
  A_conv``), and the adjoint is one ``convolution_backward`` (autograd through the
  padding for non-zero padding modes); linear layers of one shape go through one
  (batched) matmul;
* every vector lives in one flat buffer (each wrapper's ``vectors`` buffer is a view of
  it, so ``state_dict`` and the wrapper's own code see the usual tensors), so the
  normalisation and sigma of every operator take a handful of ops in all (a segmented
  sum for the norms), and every wrapper's ``sigma`` is a view of one buffer too
  (:mod:`fastclip.wrapping.tracking_plan`);
* batch-norm wrappers' closed-form sigma_1 and every wrapper's step counter are
  ``torch._foreach_*`` ops over all of them.

The wrappers' schedules run per wrapper, on the host, in module order, before the
model's forward (refinement of a wrapper no group takes, the log); each wrapper's
forward then passes through. At a clip step on a GPU (:data:`LOCKSTEP_CLIPS`) the
clips of every due wrapper run together (:meth:`BatchedTracker.clip_due_`,
:mod:`fastclip.wrapping.lockstep_clip`): each wrapper's
:meth:`fastclip.wrapping.clip_step.ClipStep.run` makes its own decisions while the
estimates its rounds ask for are made in lockstep, one
:func:`fastclip.linalg.lockstep.lanczos_many` per round over the rows of the groups they
are in. Wrappers that do not fit a group (``k > 1``, a composition that is not Conv+BN,
a custom layer) are stepped as usual by their own ``refine_``. The result is the
per-layer iteration's to rounding (the tests hold it to 1e-4 relative). Nothing changes
for a wrapper used alone: the batching lives here and is attached by the ``fastclip``
method of the pipeline, or by hand (:func:`attach`).

Example (two convs of one signature: one group, whose vectors pass as one grouped
convolution)::

    >>> import torch
    >>> from torch import nn
    >>> import fastclip
    >>> from fastclip.batched import attach, detach, tracker_of
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(
    ...     fastclip.SpectralNorm(nn.Conv2d(4, 4, 3, padding=1), identifier="conv1"),
    ...     nn.ReLU(),
    ...     fastclip.SpectralNorm(nn.Conv2d(4, 4, 3, padding=1), identifier="conv2"),
    ... ).train()
    >>> tracker = attach(model)  # a forward pre-hook of the model, one per model
    >>> attach(model) is tracker is tracker_of(model)
    True
    >>> x = torch.randn(8, 4, 16, 16)
    >>> _ = model(x)  # the first batch: each wrapper starts itself in its forward
    >>> _ = model(x)  # a step of both wrappers in the tracker's batched ops
    >>> [(g.kind, g.G) for g in tracker.groups]
    [('conv', 2)]
    >>> all(float(m.sigma) > 0 for m in model if isinstance(m, fastclip.SpectralNorm))
    True
    >>> detach(model)  # the wrappers step themselves again, layer by layer
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fastclip.linalg.batchnorm import bn_singular_values
from fastclip.linalg.operator import full_precision, unwrap
from fastclip.wrapper import SpectralNorm
from fastclip.wrapping.groups import OperatorGroup, bn_scales_squared
from fastclip.wrapping.lockstep_clip import LOCKSTEP_CLIPS, LockstepClips, lockstep_clips
from fastclip.wrapping.tracking_plan import build_plan, plan_is_current, refresh_scales

__all__ = ["LOCKSTEP_CLIPS", "BatchedTracker", "attach", "detach", "lockstep_clips", "tracker_of"]

# the group's former name here (benchmarks/op_counts.py counts its passes)
_Group = OperatorGroup


class BatchedTracker(LockstepClips):
    """Steps every wrapper of ``model`` at once before each training forward (see the
    module docstring). ``step()`` is what the forward pre-hook calls; ``groups`` lists the
    operator groups of the current plan (built at the first step where every wrapper has
    seen a batch, rebuilt when a wrapper's buffers were replaced). The clip step is
    :class:`fastclip.wrapping.lockstep_clip.LockstepClips`'s.

    ``wrappers``: an explicit list to step instead of the wrappers inside ``model``
    (wrappers held outside the model, :class:`fastclip.Clipper`), in the order their
    schedules run (a composition after the layers it starts with: on the CPU each clips
    in that order). ``share_weights=False`` leaves the layers' weight storage alone (the
    groups stack the weights at each pass instead of making them views of one stack)."""

    def __init__(
        self,
        model: nn.Module,
        wrappers: list[SpectralNorm] | None = None,
        share_weights: bool = True,
    ) -> None:
        self.model = model
        self.explicit = None if wrappers is None else list(wrappers)
        self.share_weights = share_weights
        self.groups: list[OperatorGroup] = []
        self._plan: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> BatchedTracker:
        # a copied model (e.g. a float64 copy to measure) gets a tracker of its own,
        # whose plan is rebuilt from the copied wrappers at its first step
        wrappers = None if self.explicit is None else copy.deepcopy(self.explicit, memo)
        return BatchedTracker(copy.deepcopy(self.model, memo), wrappers, self.share_weights)

    def _wrappers(self) -> list[SpectralNorm]:
        if self.explicit is not None:
            return list(self.explicit)
        return [m for m in self.model.modules() if isinstance(m, SpectralNorm)]

    def _valid(self, wrappers: list[SpectralNorm]) -> bool:
        """Whether the current plan still holds for ``wrappers``
        (:func:`fastclip.wrapping.tracking_plan.plan_is_current`)."""
        return plan_is_current(self._plan, self.groups, wrappers)

    # -- the batched iteration -----------------------------------------------------
    def iterate(self) -> None:
        """One PowerQR iteration of every grouped operator (the wrappers' vectors and
        sigma buffers are views of the plan's buffers: updated in place)."""
        p = self._plan
        refresh_scales(p)
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
            built = build_plan(wrappers, share_weights=self.share_weights)
            self._plan = None
            if built is not None:
                self.groups, self._plan = built
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
                torch._foreach_copy_(
                    p["bn_sigma"], torch._foreach_sqrt(torch._foreach_max(bn_scales_squared(bns)))
                )
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
