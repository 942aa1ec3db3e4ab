"""``SpectralNorm``: track and clip a layer's spectral norm inside a plain training loop.

The wrapper keeps the top-``k`` right singular vectors of the wrapped layer's linear
part (at the input size of the first batch it sees) in a buffer. Every forward pass in
training mode it

1. refines them with ``pqr_iter`` warm-started PowerQR iterations (one forward +
   backward of the layer on ``k`` vectors each) and stores ``sigma_1`` in ``sigma``;
2. every ``clip_steps`` steps after ``init_delay``, if ``clip_flag`` and
   ``sigma_1 > clip``, clips: FastClip's least-squares fit of ``A v_i -> clip * u_i``
   on the layer's ``*weight`` parameters for a convolution or a composition
   (:func:`fastclip.clipping.fit_directions_`), the exact SVD clamp for ``nn.Linear``,
   Gouk et al.'s gamma clamp for batch norm;
3. writes ``train/lsv_<identifier>`` to a tensorboardX ``writer`` every
   ``summary_steps`` steps when ``summary=True``.

In eval mode it is the wrapped layer, untouched. Batch norm is tracked by its closed
form. The wrapped layer is ``wrapper.module``; state (vectors, sigma, step, input
shape) lives in buffers, so ``state_dict`` round-trips.

Example::

    >>> writer = tensorboardX.SummaryWriter("runs/demo")
    >>> conv = SpectralNorm(nn.Conv2d(1, 64, 3, padding=1), clip=1.0, summary=True,
    ...                     writer=writer, identifier="conv1")
    >>> # the Conv+BN composition of the seed tutorial (CNNBN):
    >>> block = SpectralNorm(CNNBN(1, 64), clip=1.0, identifier="_concat")
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from torch import nn

from fastclip.batchnorm import bn_singular_values, clamp_bn_
from fastclip.clipping import clamp_linear_, fit_directions_, weight_parameters
from fastclip.operator import BN_TYPES, CONV_TYPES, AffineOperator, full_precision, unwrap
from fastclip.spectral import lanczos, power_qr, power_qr_many

__all__ = ["SpectralNorm"]

log = logging.getLogger(__name__)

# Clip-step measurements stop early once sigma_1 is proven above this many times c.
_FAR_ABOVE = 1.05


def _plain_name(name: str) -> str:
    """A parameter name without the wrappers' ``module`` levels."""
    return ".".join(part for part in name.split(".") if part != "module")


def _resolve_clip_params(inner: nn.Module, kind: str, clip_params: str | Sequence[str]) -> tuple[str, ...] | None:
    """The plain names of the parameters a clip may change (None: every ``*weight``)."""
    choices = sorted(_plain_name(n) for n in weight_parameters(inner))
    if isinstance(clip_params, str):
        if clip_params == "all":
            return None
        if clip_params != "auto":
            raise ValueError(f"clip_params must be 'auto', 'all' or a list of parameter names, got {clip_params!r}")
        gammas = tuple(_plain_name(f"{name}.weight") for name, m in inner.named_modules()
                       if isinstance(m, BN_TYPES) and m.weight is not None and m.weight.requires_grad)
        return gammas if kind == "composition" and gammas else None
    names = tuple(clip_params)
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"clip_params must name trainable '*weight' parameters of the wrapped module; "
                         f"got {list(names)}, choices: {choices}")
    return names


class SpectralNorm(nn.Module):
    """Track (and clip) the spectral norm of ``module`` during training.

    Args (the published wrapper's names and defaults):
        module: Conv1d/2d/3d, ConvTranspose, Linear, BatchNorm, or any affine
            composition of them (e.g. a Conv+BN block).
        clip_flag: clip (True) or only track (False).
        clip: the target spectral norm ``c``.
        summary: write ``train/lsv_<identifier>`` scalars to ``writer``.
        writer: a tensorboardX (or torch.utils.tensorboard) SummaryWriter, or None.
        identifier: suffix of the TensorBoard tag (default: the layer's class name).
        k: number of singular vectors tracked.
        clip_steps: clip every this many training steps ...
        init_delay: ... once this many steps have passed.
        pqr_iter: PowerQR iterations per training step (warm-started).
        track_steps: refine the vectors every this many steps (1: every step, the
            published wrapper); 0: only at the steps that use them, clip steps and
            summary steps (``sigma`` then holds the value measured there). The clip
            step's block Lanczos starts from the vectors either way.
        init_pqr_iter: PowerQR iterations from a random start on the first step.
        clip_opt_iter: least-squares iterations per clip.
        clip_opt_stepsize: step for ``line_search=False`` (default 0.35, 0.01 for a
            composition); with the default exact line search it is not needed.
        deflate_iter: clip rounds per clip step, re-estimating the vectors between.
        device: accepted for compatibility; the wrapper follows the module's device.
        exact: the authors' variant that also raises a convolution's sigma_1 to ``c``
            when it is below ``c - 0.05`` (default: bound from above only).
        line_search: exact line search / CGLS (True) or fixed-step gradient steps.
        refine_iter: cap on the layer passes of the estimate made at each clip
            step and after each clip round (published: 10 PowerQR iterations; we
            use block Lanczos).
        refine_tol: its relative residual tolerance (on sigma_1).
        clip_block: Lanczos block size of that estimate; every Ritz direction it
            finds above ``clip`` is fitted in the same round.
        max_clip_rounds: after the ``deflate_iter`` rounds, keep fitting while the
            measured sigma_1 exceeds ``1.01 clip``, up to this many rounds in all (a
            layer that drifted far above ``c`` between clip steps needs several).
        summary_steps: write a scalar every this many steps (published: 50).
        clip_margin: directions found above ``clip`` are fitted to
            ``clip * (1 - clip_margin)`` (published: to ``clip``, i.e. 0). A small
            margin absorbs the part of the excess one least-squares fit leaves and the
            neighbours of the fitted directions, so fewer rounds reach the 1.01 c band.
            Measured on a ResNet18 clip step (41 wrappers, 5 SGD steps after the
            previous clip): margin 0 took 35.0 s, exact sigma_1 after it <= 1.018 c
            (conv) / 1.012 c (Conv+BN), median 1.008 c; margin 0.02 took 26.5 s,
            <= 1.015 c / 1.008 c, median 1.004 c.
        rescale_above: when a clip step finds sigma_1 above ``rescale_above * clip``
            (the layer drifted far since the last clip), first scale the fitted weight
            by ``clip (1 - clip_margin) / sigma_1`` (exact for a map linear in it: every
            singular value shrinks by that factor, the directions stay). That
            measurement is converged before the rescale (no early stop above
            ``rescale_above * clip``), so the scaled values are the measurement after
            it; fits follow only if it did not converge or the result is still above
            ``1.01 clip``. Direction
            fits cannot get there: a layer far above c has hundreds of directions above
            it, and 10 rounds of fits (~30 directions each) leave it above c. Measured on
            ResNet18 (wBN, random data, lr 0.1) 50 steps after a clip: tracked sigma_1
            up to 12 c, clip step 19.9 s without. 0 or None: never (the published clip).
        clip_params: what a clip may change. ``"auto"`` (default): for a
            composition that contains batch norm, BN's weight (gamma) only; otherwise
            every ``*weight``. ``"all"``: every ``*weight`` (the published update).
            Or a list of parameter names in the wrapped module (wrapper levels
            ``module.`` left out, e.g. ``["bn.weight"]``). Why gamma for a Conv+BN
            composition: batch norm's running variance follows the conv's output
            scale, so shrinking the conv is undone within ~1/momentum steps and each
            clip shrinks the conv further while BN's scale grows to compensate;
            gamma's changes stay.
    """

    _fastclip_wrapper = True

    def __init__(self, module: nn.Module, clip_flag: bool = True, clip: float = 1.0, summary: bool = False,
                 writer: Any = None, identifier: str = "", k: int = 1, clip_steps: int = 50,
                 init_delay: int = 500, pqr_iter: int = 1, init_pqr_iter: int = 100, clip_opt_iter: int = 5,
                 track_steps: int = 1,
                 clip_opt_stepsize: float | None = None, deflate_iter: int = 1, device: Any = None,
                 exact: bool = False, line_search: bool = True, refine_iter: int = 15, refine_tol: float = 1e-3,
                 clip_block: int = 4, max_clip_rounds: int = 10,
                 summary_steps: int = 50, clip_params: str | Sequence[str] = "auto",
                 clip_margin: float = 0.02, rescale_above: float | None = 2.0) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"SpectralNorm wraps an nn.Module, got {type(module).__name__}")
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        for name, value in (("k", k), ("clip_steps", clip_steps), ("init_pqr_iter", init_pqr_iter),
                            ("summary_steps", summary_steps)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("init_delay", init_delay), ("pqr_iter", pqr_iter), ("clip_opt_iter", clip_opt_iter),
                            ("track_steps", track_steps),
                            ("deflate_iter", deflate_iter), ("refine_iter", refine_iter)):
            if int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= clip_margin < 1:
            raise ValueError(f"clip_margin must be in [0, 1), got {clip_margin}")
        if rescale_above and not rescale_above > 1:
            raise ValueError(f"rescale_above must be > 1 (or 0/None: never), got {rescale_above}")
        self.module = module
        inner = unwrap(module)
        self.kind = ("bn" if isinstance(inner, BN_TYPES) else "linear" if isinstance(inner, nn.Linear)
                     else "conv" if isinstance(inner, CONV_TYPES) else "composition")
        self.clip_flag = bool(clip_flag)
        self.clip = float(clip)
        self.summary = bool(summary)
        self.writer = writer
        self.identifier = identifier or type(inner).__name__
        self.k = int(k)
        self.clip_steps = int(clip_steps)
        self.init_delay = int(init_delay)
        self.pqr_iter = int(pqr_iter)
        self.init_pqr_iter = int(init_pqr_iter)
        self.track_steps = int(track_steps)
        self.clip_opt_iter = int(clip_opt_iter)
        if clip_opt_stepsize is None:
            clip_opt_stepsize = 0.01 if self.kind == "composition" else 0.35
        self.clip_opt_stepsize = float(clip_opt_stepsize)
        self.deflate_iter = int(deflate_iter)
        self.exact = bool(exact)
        self.line_search = bool(line_search)
        self.refine_iter = int(refine_iter)
        self.refine_tol = float(refine_tol)
        self.clip_block = int(clip_block)
        self.max_clip_rounds = int(max_clip_rounds)
        self.summary_steps = int(summary_steps)
        self.clip_margin = float(clip_margin)
        self.rescale_above = float(rescale_above or 0.0)
        self.rescales = 0  # clip steps that started with a rescale (diagnostics)
        self.sigma_at_clip = float("nan")  # what the last clip step's first estimate found (diagnostics)
        self.clip_params = _resolve_clip_params(inner, self.kind, clip_params)
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("vectors", None)
        self.register_buffer("input_shape", None)
        self._step = 0  # Python mirror of `step`: schedules must not sync the device
        self._shape: tuple[int, ...] | None = None  # ... and of `input_shape`
        self._op: AffineOperator | None = None
        self._clipped_at = -1  # step at which an enclosing composition already clipped this layer
        self._tracked_at = -1  # ... already refined this layer's vectors (in its own batched pass)
        if self.clip_flag:
            log.info("SpectralNorm(%s): clipping to %g every %d steps after %d", self.identifier, self.clip,
                     self.clip_steps, self.init_delay)

    # -- state -------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("vectors", "input_shape"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                ref = self.sigma if name == "vectors" else self.step
                setattr(self, name, torch.empty_like(state_dict[key], device=ref.device,
                                                     dtype=state_dict[key].dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "step" in state_dict:
            self._step = int(state_dict[prefix + "step"])
        self._shape = None if self.input_shape is None else tuple(int(d) for d in self.input_shape.tolist())
        self._op = None

    def __deepcopy__(self, memo: dict) -> "SpectralNorm":
        # The writer owns a queue and a thread, which cannot be copied: the copy shares
        # it (measuring a copy in float64 must work on a wrapper that logs).
        if self.writer is not None:
            memo[id(self.writer)] = self.writer
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key == "_op" else copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return (f"identifier={self.identifier!r}, clip_flag={self.clip_flag}, clip={self.clip}, k={self.k}, "
                f"clip_steps={self.clip_steps}, init_delay={self.init_delay}")

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The per-sample input shape the operator is measured at (None before the first batch)."""
        if self._shape is None and self.input_shape is not None:  # e.g. a buffer set by hand
            self._shape = tuple(int(d) for d in self.input_shape.tolist())
        return self._shape

    # -- forward -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and args and isinstance(args[0], torch.Tensor):
            self.track_(tuple(args[0].shape[1:]))
        return self.module(*args, **kwargs)

    def _operator(self, input_shape: tuple[int, ...]) -> AffineOperator:
        if self._op is None or self._op.input_shape != input_shape:
            self._op = AffineOperator(self.module, input_shape)
        return self._op

    def _clip_due(self, step: int) -> bool:
        return (self.clip_flag and step >= self.init_delay and step % self.clip_steps == 0
                and self._clipped_at != step)

    def _track_due(self, step: int) -> bool:
        return ((self.track_steps and step % self.track_steps == 0) or self._clip_due(step)
                or (self.summary and self.writer is not None and step % self.summary_steps == 0))

    @torch.no_grad()
    def track_(self, input_shape: tuple[int, ...]) -> None:
        """One training step of the wrapper: refine sigma_1, clip on schedule, log.
        Inside ``torch.autocast`` the iterations still run in the layer's precision."""
        with full_precision(self.step.device):
            self._track(input_shape)

    def _track(self, input_shape: tuple[int, ...]) -> None:
        if self.kind == "bn":
            self.sigma.copy_(bn_singular_values(unwrap(self.module), k=1)[0])
        else:
            op = self._operator(input_shape)
            if self.vectors is None or self.shape != input_shape:
                if self.vectors is not None:
                    log.warning("SpectralNorm(%s): input shape changed from %s to %s; restarting the vectors",
                                self.identifier, self.shape, input_shape)
                self.input_shape = torch.tensor(input_shape, dtype=torch.long, device=self.step.device)
                self._shape = tuple(input_shape)
                X = torch.randn((self.k, *input_shape), device=op.device, dtype=op.dtype)
                r = power_qr(op, X=X, n_iter=self.init_pqr_iter)
                self.vectors = r.right.clone()
                self.sigma.copy_(r.values[0])
            elif self._tracked_at != self._step and self._track_due(self._step):
                self.refine_()
        step = self._step
        # Log what the layer reached before this step's clip, so the curve shows any
        # drift between clips rather than the freshly clipped value.
        if self.summary and self.writer is not None and step % self.summary_steps == 0:
            self.writer.add_scalar(f"train/lsv_{self.identifier}", float(self.sigma), step)
        if self._clip_due(step):
            self.clip_()
        self._clipped_at = -1
        self._tracked_at = -1
        self._step += 1
        self.step.add_(1)

    @torch.no_grad()
    def refine_(self) -> None:
        """``pqr_iter`` warm-started PowerQR iterations on the tracked vectors (what a
        training step does), together with those of the wrappers inside a composition
        that start with the same layer (one batched pass; they skip their own in the
        same step)."""
        if self.vectors is None or not self.pqr_iter or self.kind == "bn":
            return
        op = self._operator(self.shape)
        partners = self._joint_partners(op)
        rs = power_qr_many([op] + [w._operator(op.input_shape) for w in partners],
                           [self.vectors] + [w.vectors for w in partners], n_iter=self.pqr_iter)
        for w, r in zip([self] + partners, rs):
            w.vectors.copy_(r.right)
            w.sigma.copy_(r.values[0])
        for w in partners:
            w._tracked_at = w._step  # its own forward comes later in this one

    def _joint_partners(self, op: AffineOperator) -> list["SpectralNorm"]:
        """Wrappers inside this composition whose operator starts with the same layer at
        the same input size (the conv of a Conv+BN pair): their per-step iteration
        shares this one's batched pass (:func:`fastclip.spectral.power_qr_many`)."""
        if self.kind != "composition" or not op._factors:
            return []
        first = op._factors[0][0]
        partners = []
        for w in self.module.modules():
            if (isinstance(w, SpectralNorm) and w.kind in ("conv", "linear") and w.vectors is not None
                    and w.shape == op.input_shape and w.pqr_iter == self.pqr_iter):
                w_op = w._operator(op.input_shape)
                if w_op._factors and w_op._factors[0][0] is first:
                    partners.append(w)
        return partners

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip now (what the schedule calls). Needs the input shape of a first batch,
        except for batch norm."""
        inner = unwrap(self.module)
        c = self.clip
        if self.kind == "bn":
            clamp_bn_(inner, c)
            self.sigma.copy_(bn_singular_values(inner, k=1)[0])
            return
        if self.kind == "linear":
            clamp_linear_(inner, c, return_values=False)
        if self.vectors is None:
            raise RuntimeError(f"SpectralNorm({self.identifier}) has not seen an input yet: "
                               "run a training-mode forward pass before clipping")
        if self.kind == "composition":
            # A composition runs its schedule before its inner layers do (the forward
            # reaches them later), but it must be clipped last: an inner conv's clip
            # after it would lower the composition below c again (and, with the clip
            # through gamma only, it has no other way to reach the conv).
            for inner_wrapper in self.module.modules():
                if (isinstance(inner_wrapper, SpectralNorm) and inner_wrapper.clip_flag
                        and inner_wrapper.kind in ("conv", "linear") and inner_wrapper.vectors is not None):
                    inner_wrapper.clip_()
                    # its own schedule fires later in this forward: no second clip
                    inner_wrapper._clipped_at = inner_wrapper._step
        op = self._operator(self.shape)
        # Clip steps are rare (every clip_steps), so they can afford a better estimate
        # than one PowerQR step: block Lanczos warm-started from the tracked vectors.
        # The top of a layer's spectrum is often flat (many directions within a few %
        # of sigma_1), so every Ritz direction found above c is shrunk in the same fit;
        # fitting a few at a time only uncovers the next ones.
        block = max(1, min(self.clip_block, op.n - 1, op.m - 1))

        # the random vector of each measurement, drawn on the layer's device
        gen = torch.Generator(device=op.device).manual_seed(self._step)

        far = self.rescale_above * c if self.rescale_above and self.kind != "linear" else None

        def measure(X: torch.Tensor, stop_below: float | None = None):
            # The warm start is the tracked vector or the directions just fitted (or
            # rescaled): nearly exact singular vectors, whose span is nearly invariant,
            # so Lanczos would "converge" at once on them even when sigma_1 lies
            # elsewhere. A random vector and a third of the pass budget before any stop
            # let the true top emerge. A measurement may stop at that point once its top
            # Ritz value (a lower bound of sigma_1) proves the layer is still above
            # _FAR_ABOVE c: the loop below fits again in that case whatever more passes
            # would show. Measured on a ResNet18 that drifted far above c (wBN, 41
            # wrappers, sigma_1 up to 2.5 c): 21.5 -> 11.8 s for that early stop. The
            # first measurement does not stop early above rescale_above c: the rescale
            # uses its value, converged. The tolerance is relative to c (a layer far
            # below c needs its sigma_1 to the tolerance of c, not of itself).
            return lanczos(op, k=self.k, X=X[: max(self.k, block)], block=block, tol=self.refine_tol,
                           max_passes=self.refine_iter, extra_random=1, generator=gen,
                           min_value=c if self.kind != "linear" else None, tol_floor=c,
                           stop_above=_FAR_ABOVE * c, stop_below=stop_below,
                           min_passes=max(1, self.refine_iter // 3))

        # Host decisions below use r.top, sigma_1 as read back with Lanczos's stopping
        # rule: the clip step waits for the device once per check, not per decision.
        r = measure(self.vectors, stop_below=far)
        self.sigma_at_clip = r.top
        if self.kind != "linear":
            params = weight_parameters(inner)
            if self.clip_params is not None:
                params = {n: p for n, p in params.items() if _plain_name(n) in self.clip_params}
            rescaled = bool(far and r.top > far)
            if rescaled:
                # Every map here is linear in each single weight (conv, BN gamma, linear),
                # so scaling one scales the whole spectrum and keeps the singular vectors:
                # a converged measurement, scaled, is the measurement after the rescale.
                # Otherwise (its value is only a lower bound) measure again; the fits
                # below remove what is left above c. The target is c (1 - clip_margin),
                # as for fitted directions: a converged Ritz value can still lie a little
                # below sigma_1 when the top of the spectrum is flat (seen: 2 % on a
                # ResNet18 layer4 conv), and the margin absorbs that.
                f = c * (1 - self.clip_margin) / r.top
                next(iter(params.values())).mul_(f)
                self.rescales += 1
                log.debug("SpectralNorm(%s): sigma_1 >= %.3g > %g c, weight rescaled", self.identifier,
                          r.top, self.rescale_above)
                if r.converged:
                    r.values = r.values * f
                    r.top = r.top * f
                else:
                    r = measure(r.right[: max(self.k, block)])
            for rnd in range(max(self.deflate_iter, self.max_clip_rounds)):
                s, top = r.values, r.top
                # (deflate_iter forces fit rounds; a rescale was one, of every direction)
                if (rnd >= self.deflate_iter or rescaled) and top <= 1.01 * c:
                    break
                raise_up = self.exact and self.kind == "conv" and top < c - 0.05
                if top <= c and not raise_up:
                    break
                new = torch.full_like(s, c) if raise_up else \
                    torch.where(s > c, s.new_tensor(c * (1 - self.clip_margin)), s)
                targets = r.left * new.view(-1, *([1] * (r.left.dim() - 1)))
                fit_directions_(inner, r.right, targets, n_iter=self.clip_opt_iter,
                                line_search=self.line_search, stepsize=self.clip_opt_stepsize, params=params,
                                return_loss=False)
                r = measure(r.right[: max(self.k, block)])
        r.right = r.right[: self.k]
        self.vectors.copy_(r.right)
        self.sigma.copy_(r.values[0])
