"""One clip step of a :class:`fastclip.SpectralNorm` wrapper (convolutions, linear
layers and compositions; batch norm is clamped in closed form by the wrapper).

With ``c = clip`` and the layer's linear part ``A``:

1. estimate the top of the spectrum by block Lanczos on ``A^T A``, warm-started from
   the tracked vectors (:meth:`ClipStep.measure`; an estimate whose value the step keeps,
   the wrapper's sigma, is converged to ``refine_tol`` of c unless it ran
   ``4 refine_iter`` passes);
2. if ``sigma_1 > rescale_above * c``, scale the weight by ``c (1 - clip_margin) / sigma_1``
   (:meth:`ClipStep.rescale`: exact, every singular value scales by the factor);
3. while ``sigma_1 > 1.01 c`` (at most ``max_clip_rounds`` rounds): fit the weights by
   least squares to ``A v_i -> min(sigma_i, c (1 - clip_margin)) u_i`` on every Ritz
   direction found above c (:func:`fastclip.clipping.fit_directions_`), estimate again
   (:meth:`ClipStep.fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastclip.clipping import fit_directions_, weight_parameters
from fastclip.spectral import SpectralResult, _left_vectors, lanczos

if TYPE_CHECKING:  # annotations only: the wrapper imports this module
    from fastclip.wrapper import SpectralNorm

__all__ = ["ClipStep", "Measure", "drive", "plain_name"]

log = logging.getLogger("fastclip.wrapper")

# Clip-step estimates stop early once sigma_1 is proven above this many times c.
_FAR_ABOVE = 1.05
# A clip step fits again while sigma_1 is above this many times c (its band).
_BAND = 1.01
# An estimate whose value a clip step keeps may take this many times refine_iter passes to converge.
_FINISH = 4


def plain_name(name: str) -> str:
    """A parameter name without the wrappers' ``module`` levels."""
    return ".".join(part for part in name.split(".") if part != "module")


@dataclass
class Measure:
    """A clip step's request for an estimate (:meth:`ClipStep.measure`'s arguments)."""

    X: torch.Tensor
    stop_below: float | None = None
    #: past ``refine_iter`` passes, stop (unconverged) once sigma_1 is proven above this:
    #: the step fits again on such a value; None: the step keeps the value, which converges
    #: (no early stop above ``_FAR_ABOVE c`` either)
    band: float | None = None


#: What :meth:`ClipStep.run` is: it yields the estimates it needs and is sent their results.
ClipRun = Generator[Measure, SpectralResult, None]


def drive(run: ClipRun, measure: Callable[[Measure], SpectralResult]) -> None:
    """Run one clip step to its end, making each estimate it asks for with ``measure``
    (:meth:`ClipStep.measure` for a wrapper alone; :mod:`fastclip.batched` makes the
    estimates of many wrappers' steps together instead)."""
    try:
        request = next(run)
        while True:
            request = run.send(measure(request))
    except StopIteration:
        pass


class ClipStep:
    """One clip step of a wrapper: its Lanczos estimates (sharing one random generator,
    seeded by the step) and the rescale and fit rounds between them. :meth:`run` makes
    the decisions and yields the estimates it needs (:class:`Measure`), so that a driver
    may make the estimates of many layers' steps at once."""

    def __init__(self, wrapper: SpectralNorm) -> None:
        self.w, self.cfg = wrapper, wrapper.config
        self.c = self.cfg.clip
        self.op = wrapper._operator(wrapper.shape)
        self.linear = wrapper.kind == "linear"
        # Clip steps are rare (every clip_steps), so they can afford a better estimate
        # than one PowerQR step: block Lanczos warm-started from the tracked vectors.
        self.block = max(1, min(self.cfg.clip_block, self.op.n - 1, self.op.m - 1))
        self.gen = torch.Generator(device=self.op.device).manual_seed(wrapper.schedule.step)
        self.far = self.cfg.rescale_above * self.c if self.cfg.rescale_above and not self.linear else None

    def measure(self, request: Measure) -> SpectralResult:
        """Block Lanczos from ``request.X`` plus one random vector.

        The warm start is the tracked vector or the directions just fitted (or
        rescaled): nearly exact singular vectors, whose span is nearly invariant, so
        Lanczos would "converge" at once on them even when sigma_1 lies elsewhere. A
        random vector and a third of the pass budget before any stop let the true top
        emerge. It may stop there once its top Ritz value (a lower bound of sigma_1)
        proves the layer still above ``_FAR_ABOVE c``: the caller fits again in that case
        whatever more passes would show (an estimate no fit round follows, ``request.band``
        None, never stops so). The first estimate passes ``stop_below`` (the
        rescale threshold) so that a rescale uses a converged value. The tolerance is
        relative to c: a layer far below c needs its sigma_1 to the tolerance of c.

        After ``refine_iter`` passes it stops once sigma_1 is proven above
        ``request.band`` (the step fits again on such a value, whatever more passes would
        show); any other estimate, whose value the step may keep as the wrapper's sigma,
        goes on until it converges (at most ``_FINISH * refine_iter`` passes in all): a
        clustered top of the spectrum, which a clip leaves, can need more than
        ``refine_iter``, and a value cut there lies below sigma_1 by more than the
        tolerance."""
        cfg, c = self.cfg, self.c
        return lanczos(
            self.op,
            k=cfg.k,
            X=request.X,
            block=self.block,
            tol=cfg.refine_tol,
            max_passes=_FINISH * cfg.refine_iter,
            budget=cfg.refine_iter,
            budget_above=request.band,
            extra_random=1,
            generator=self.gen,
            min_value=None if self.linear else c,
            tol_floor=c,
            stop_above=None if request.band is None else _FAR_ABOVE * c,
            stop_below=request.stop_below,
            min_passes=max(1, cfg.refine_iter // 3),
        )

    def request(self, X: torch.Tensor, stop_below: float | None = None, final: bool = False) -> Measure:
        """The estimate from ``X``; ``final``: no fit round follows it, its value is kept
        whatever it is (no band; otherwise the band is ``1.01 c``, above which a round fits)."""
        band = None if final or self.linear else _BAND * self.c
        return Measure(X[: max(self.cfg.k, self.block)], stop_below, band)

    def run(self, inner: nn.Module) -> ClipRun:
        """The clip step: estimate, rescale and fit rounds, then the wrapper's vectors and
        sigma set from the last estimate (``inner``: the wrapped layer)."""
        w = self.w
        assert w.vectors is not None  # (the wrapper checks before it starts a step)
        r = yield self.request(w.vectors, stop_below=self.far)
        w.sigma_at_clip = r.top
        if not self.linear:
            r = yield from self.fit(inner, r)
        w.vectors.copy_(r.right[: w.k])
        w.sigma.copy_(r.values[0])
        if not r.converged:  # (only past _FINISH * refine_iter passes: see measure)
            log.warning(
                "SpectralNorm(%s): sigma %.4g after the clip is a lower bound, not converged in %d passes",
                w.identifier,
                r.top,
                r.passes,
            )

    def fit(self, inner: nn.Module, r: SpectralResult) -> Generator[Measure, SpectralResult, SpectralResult]:
        """Rescale a layer found far above c, then fit rounds until ``sigma_1 <= 1.01 c``."""
        params = weight_parameters(inner)
        if self.w.clip_params is not None:
            params = {n: p for n, p in params.items() if plain_name(n) in self.w.clip_params}
        rescaled = bool(self.far and r.top > self.far)
        if rescaled:
            r = yield from self.rescale(params, r)
        cfg, c = self.cfg, self.c
        rounds = max(cfg.deflate_iter, cfg.max_clip_rounds)
        for rnd in range(rounds):
            # (deflate_iter forces fit rounds; a rescale was one, of every direction)
            if (rnd >= cfg.deflate_iter or rescaled) and r.top <= _BAND * c:
                break
            raise_up = cfg.exact and self.w.kind == "conv" and r.top < c - 0.05
            if r.top <= c and not raise_up:
                break
            s = r.values
            new = (
                torch.full_like(s, c)
                if raise_up
                else torch.where(s > c, s.new_tensor(c * (1 - cfg.clip_margin)), s)
            )
            left = r.left if r.left is not None else _left_vectors(self.op, r.right, r.values)
            targets = left * new.view(-1, *([1] * (left.dim() - 1)))
            fit_directions_(
                inner,
                r.right,
                targets,
                n_iter=cfg.clip_opt_iter,
                line_search=cfg.line_search,
                stepsize=cfg.clip_opt_stepsize,
                params=params,
                return_loss=False,
            )
            r = yield self.request(r.right, final=rnd == rounds - 1)
        return r

    def rescale(
        self, params: dict[str, nn.Parameter], r: SpectralResult
    ) -> Generator[Measure, SpectralResult, SpectralResult]:
        """Scale the first fitted weight by ``c (1 - clip_margin) / sigma_1``.

        Every map here is linear in each single weight (conv, BN gamma, linear), so
        scaling one scales the whole spectrum and keeps the singular vectors: a
        converged estimate, scaled, is the estimate after the rescale. Otherwise (its
        value is only a lower bound) it is made again. The target has the margin of the
        fitted directions: a converged Ritz value can still lie a little below sigma_1
        when the top of the spectrum is flat."""
        f = self.c * (1 - self.cfg.clip_margin) / r.top
        next(iter(params.values())).mul_(f)
        self.w.rescales += 1
        log.debug(
            "SpectralNorm(%s): sigma_1 >= %.3g > %g c, weight rescaled",
            self.w.identifier,
            r.top,
            self.cfg.rescale_above,
        )
        if r.converged:
            r.values = r.values * f
            r.top = r.top * f
            return r
        return (yield self.request(r.right))
