"""``SpectralNorm``: track and clip a layer's spectral norm inside a plain training loop.

The wrapper keeps the top-``k`` right singular vectors ``V`` of the wrapped layer's
linear part ``A`` (at the input size of the first batch it sees) in a buffer. Every
forward pass in training mode it

1. refines them with ``pqr_iter`` warm-started PowerQR iterations,
   ``V <- qr(V + A^T A V)``, ``sigma_i = sqrt(|R_ii - 1|)`` (one forward + backward of
   the layer on ``k`` vectors each), and stores ``sigma_1`` in ``sigma``;
2. on its schedule (every ``clip_steps`` steps after ``init_delay``, see
   :mod:`fastclip.wrapping.schedule`), if ``clip_flag`` and ``sigma_1 > clip``, clips: for a
   convolution or a composition, rounds of least-squares fits of the weights to
   ``A v_i -> min(sigma_i, c (1 - clip_margin)) u_i`` on every direction a block
   Lanczos estimate finds above ``c`` (:func:`fastclip.clipping.fit_directions_`), until
   ``sigma_1 <= 1.01 c``; the exact SVD clamp for ``nn.Linear``; Gouk et al.'s gamma
   clamp for batch norm;
3. writes ``train/lsv_<identifier>`` to a tensorboardX ``writer`` every
   ``summary_steps`` steps when ``summary=True``.

In eval mode it is the wrapped layer, untouched. Batch norm is tracked by its closed
form. The wrapped layer is ``wrapper.module``; state (vectors, sigma, step, input
shape) lives in buffers updated in place, so ``state_dict`` round-trips. The settings
are one :class:`fastclip.wrapping.config.SpectralNormConfig` (``wrapper.config``).

Example::

    >>> conv = SpectralNorm(nn.Conv2d(1, 64, 3, padding=1), clip=1.0, identifier="conv1")
    >>> # summary=True with writer=<a tensorboardX or torch.utils.tensorboard SummaryWriter>
    >>> # logs train/lsv_conv1; a Conv+BN composition (the seed tutorial's CNNBN):
    >>> block = SpectralNorm(nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64)),
    ...                      clip=1.0, identifier="_concat")
    >>> _ = conv.train()(torch.randn(8, 1, 28, 28))  # the first batch fixes the input shape
    >>> conv.shape, float(conv.sigma) > 0
    ((1, 28, 28), True)
    >>> # the same settings as one object:
    >>> cfg = SpectralNormConfig(clip=1.0, clip_steps=100)
    >>> fc = SpectralNorm(nn.Linear(64, 10), config=cfg, identifier="fc1")
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastclip.clipping import clamp_linear_, weight_parameters
from fastclip.linalg.batchnorm import bn_singular_values, clamp_bn_
from fastclip.linalg.operator import (
    BN_TYPES,
    CONV_TYPES,
    AffineOperator,
    check_finite,
    full_precision,
    unwrap,
)
from fastclip.spectral import power_qr, power_qr_many
from fastclip.wrapping.clip_step import ClipStep, drive, plain_name
from fastclip.wrapping.config import SpectralNormConfig
from fastclip.wrapping.schedule import ClipSchedule

__all__ = ["SpectralNorm", "SpectralNormConfig", "clip_all_", "track_all_"]

log = logging.getLogger(__name__)


def _resolve_clip_params(
    inner: nn.Module, kind: str, clip_params: str | Sequence[str]
) -> tuple[str, ...] | None:
    """The plain names of the parameters a clip may change (None: every ``*weight``)."""
    if clip_params == "all":
        return None
    if clip_params == "auto":
        gammas = tuple(
            plain_name(f"{name}.weight")
            for name, m in inner.named_modules()
            if isinstance(m, BN_TYPES) and m.weight is not None and m.weight.requires_grad
        )
        return gammas if kind == "composition" and gammas else None
    choices = sorted(plain_name(n) for n in weight_parameters(inner))
    names = tuple(clip_params)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(
            f"clip_params must name trainable '*weight' parameters of the wrapped module; "
            f"got {list(names)}, choices: {choices}"
        )
    return names


def _kind(inner: nn.Module) -> str:
    return (
        "bn"
        if isinstance(inner, BN_TYPES)
        else "linear"
        if isinstance(inner, nn.Linear)
        else "conv"
        if isinstance(inner, CONV_TYPES)
        else "composition"
    )


class SpectralNorm(nn.Module):
    """Track (and clip) the spectral norm of ``module`` during training. The arguments
    are the published wrapper's names and defaults.

    Args:
        module: Conv1d/2d/3d, ConvTranspose, Linear, BatchNorm, or any affine
            composition of them (e.g. a Conv+BN block).
        clip_flag: clip (True) or only track (False).
        clip: the target spectral norm ``c`` (default 1.0).
        summary: write ``train/lsv_<identifier>`` scalars to ``writer``.
        writer: a tensorboardX (or torch.utils.tensorboard) SummaryWriter, or None.
        identifier: suffix of the TensorBoard tag (default: the layer's class name).
        config: a :class:`SpectralNormConfig` with every other setting (default: the
            published defaults).
        device: accepted for compatibility; the wrapper follows the module's device.
        **settings: any :class:`SpectralNormConfig` field by name (``k``,
            ``clip_steps``, ``init_delay``, ``pqr_iter``, ``clip_opt_iter``, ...); they
            override ``config``. Each field is also readable (and settable, validated
            again) as an attribute of the wrapper.

    ``clip_opt_stepsize=None`` becomes 0.35, or 0.01 for a composition;
    ``clip_params`` becomes the resolved parameter names (None: every ``*weight``).
    """

    _fastclip_wrapper = True

    # Buffers (registered in __init__) and the config's fields (properties added below the
    # class), declared for type checkers: nn.Module's __getattr__ is typed Tensor | Module.
    sigma: torch.Tensor
    step: torch.Tensor
    vectors: torch.Tensor | None
    input_shape: torch.Tensor | None
    if TYPE_CHECKING:
        clip: float
        k: int
        clip_steps: int
        init_delay: int
        pqr_iter: int
        init_pqr_iter: int
        track_steps: int
        clip_opt_iter: int
        clip_opt_stepsize: float | None
        deflate_iter: int
        exact: bool
        line_search: bool
        refine_iter: int
        refine_tol: float
        clip_block: int
        max_clip_rounds: int
        summary_steps: int
        clip_margin: float
        rescale_above: float | None

    def __init__(
        self,
        module: nn.Module,
        clip_flag: bool = True,
        clip: float | None = None,
        summary: bool = False,
        writer: Any = None,
        identifier: str = "",
        *,
        config: SpectralNormConfig | None = None,
        device: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"SpectralNorm wraps an nn.Module, got {type(module).__name__}")
        if config is not None and not isinstance(config, SpectralNormConfig):
            raise TypeError(f"config must be a SpectralNormConfig, got {type(config).__name__}")
        if clip is not None:
            settings["clip"] = clip
        config = config or SpectralNormConfig()
        if settings:
            config = config.replace(**settings)
        self.module = module
        inner = unwrap(module)
        self.kind = _kind(inner)
        if config.clip_opt_stepsize is None:
            config = config.replace(clip_opt_stepsize=0.01 if self.kind == "composition" else 0.35)
        self.clip_params = _resolve_clip_params(inner, self.kind, config.clip_params)
        self.schedule = ClipSchedule(config, clip_flag)
        self.summary = bool(summary)
        self.writer = writer
        self.identifier = identifier or type(inner).__name__
        self.rescales = 0  # clip steps that started with a rescale (diagnostics)
        # what the last clip step's first estimate found (diagnostics)
        self.sigma_at_clip: float | None = float("nan")
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("vectors", None)
        self.register_buffer("input_shape", None)
        self._shape: tuple[int, ...] | None = None  # host mirror of `input_shape`: no device reads
        self._op: AffineOperator | None = None
        self._driven = False  # this step already run by a driver (fastclip.batched) before the forward
        if self.clip_flag:
            log.info(
                "SpectralNorm(%s): clipping to %g every %d steps after %d",
                self.identifier,
                self.clip,
                self.clip_steps,
                self.init_delay,
            )

    # -- settings ----------------------------------------------------------------
    @property
    def config(self) -> SpectralNormConfig:
        return self.schedule.config

    @config.setter
    def config(self, config: SpectralNormConfig) -> None:
        if not isinstance(config, SpectralNormConfig):
            raise TypeError(f"config must be a SpectralNormConfig, got {type(config).__name__}")
        self.schedule.config = config

    @property
    def clip_flag(self) -> bool:
        return self.schedule.clip_flag

    @clip_flag.setter
    def clip_flag(self, value: bool) -> None:
        self.schedule.clip_flag = bool(value)

    # -- state -------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name in ("vectors", "input_shape"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                ref = self.sigma if name == "vectors" else self.step
                setattr(
                    self,
                    name,
                    torch.empty_like(state_dict[key], device=ref.device, dtype=state_dict[key].dtype),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "step" in state_dict:
            self.schedule.move_to(int(state_dict[prefix + "step"]))
        self._shape = None if self.input_shape is None else tuple(int(d) for d in self.input_shape.tolist())
        self._op = None

    def __deepcopy__(self, memo: dict) -> SpectralNorm:
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
        return (
            f"identifier={self.identifier!r}, clip_flag={self.clip_flag}, clip={self.clip}, k={self.k}, "
            f"clip_steps={self.clip_steps}, init_delay={self.init_delay}"
        )

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The per-sample input shape the operator is measured at (None before the first batch)."""
        if self._shape is None and self.input_shape is not None:  # e.g. a buffer set by hand
            self._shape = tuple(int(d) for d in self.input_shape.tolist())
        return self._shape

    def set_step(self, step: int) -> None:
        """Move the step count (buffer and schedule) to ``step``, e.g. onto a clip step."""
        self.schedule.move_to(step)
        self.step.fill_(int(step))

    def inner_wrappers(self) -> Iterator[SpectralNorm]:
        """The wrappers inside this one (the conv and BN of a wrapped Conv+BN pair)."""
        return (w for w in self.module.modules() if isinstance(w, SpectralNorm))

    # -- forward -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and args and isinstance(args[0], torch.Tensor):
            shape = tuple(args[0].shape[1:])
            if not self._driven:
                self.track_(shape)
            elif self.kind != "bn" and shape != self.shape:
                with torch.no_grad(), full_precision(self.step.device):
                    self._start(shape)  # the driver stepped it at the old input size
            self._driven = False
        return self.module(*args, **kwargs)

    def _operator(self, input_shape: tuple[int, ...]) -> AffineOperator:
        if self._op is None or self._op.input_shape != input_shape:
            try:
                # checked once per input size: a module that is not implicitly linear
                # (a LayerNorm, a ReLU inside) has no spectral norm to track or clip
                self._op = AffineOperator(self.module, input_shape, check_affine=True)
            except ValueError as e:
                raise ValueError(f"SpectralNorm({self.identifier}): {e}") from None
        return self._op

    def _logging(self) -> bool:
        return self.summary and self.writer is not None

    @torch.no_grad()
    def track_(self, input_shape: tuple[int, ...]) -> None:
        """One training step of the wrapper: refine sigma_1, clip on schedule, log.
        Inside ``torch.autocast`` the iterations still run in the layer's precision."""
        with full_precision(self.step.device):
            self._track(input_shape)

    def _track(self, input_shape: tuple[int, ...]) -> None:
        s = self.schedule
        if self.kind == "bn":
            self.sigma.copy_(bn_singular_values(unwrap(self.module), k=1)[0])
        elif self.vectors is None or self.shape != input_shape:
            self._start(input_shape)
        elif s.track_due(self._logging()):
            self.refine_()
        # Log what the layer reached before this step's clip, so the curve shows any
        # drift between clips rather than the freshly clipped value.
        if s.logs(self._logging()):
            self.writer.add_scalar(f"train/lsv_{self.identifier}", float(self.sigma), s.step)
        if s.clip_due():
            self.clip_()
        s.end_step()
        self.step.add_(1)

    @torch.no_grad()
    def step_driven_(self, finish: bool = True) -> None:
        """This training step's schedule, run before the forward by a driver that did the
        batched part for all its wrappers (:class:`fastclip.batched.BatchedTracker`: the
        refinement of the wrappers it groups, marked tracked; batch norm's sigma; the
        ``step`` buffers): the refinement of a wrapper it does not group, the log, the
        clip. The forward then passes through. ``finish=False`` stops before the clip:
        the driver makes the clips of all its wrappers together, then calls
        :meth:`finish_step_`."""
        s = self.schedule
        if self.kind != "bn" and s.track_due(self._logging()):
            self.refine_()
        if s.logs(self._logging()):
            self.writer.add_scalar(f"train/lsv_{self.identifier}", float(self.sigma), s.step)
        self._driven = True
        if finish:
            self.finish_step_()

    @torch.no_grad()
    def finish_step_(self) -> None:
        """The clip, if due and not done yet by a driver, and the step's end."""
        if self.schedule.clip_due():
            self.clip_()
        self.schedule.end_step()

    def _start(self, input_shape: tuple[int, ...]) -> None:
        """(Re)start the vectors: ``init_pqr_iter`` PowerQR iterations from random ones."""
        op = self._operator(input_shape)
        if self.vectors is not None:
            log.warning(
                "SpectralNorm(%s): input shape changed from %s to %s; restarting the vectors",
                self.identifier,
                self.shape,
                input_shape,
            )
        self.input_shape = torch.tensor(input_shape, dtype=torch.long, device=self.step.device)
        self._shape = tuple(input_shape)
        X = torch.randn((self.k, *input_shape), device=op.device, dtype=op.dtype)
        r = power_qr(op, X=X, n_iter=self.init_pqr_iter)
        self.vectors = r.right.clone()
        self.sigma.copy_(r.values[0])

    @torch.no_grad()
    def refine_(self) -> None:
        """``pqr_iter`` warm-started PowerQR iterations on the tracked vectors (what a
        training step does), together with those of the wrappers inside a composition
        that start with the same layer (one batched pass; they skip their own in the
        same step)."""
        shape = self.shape
        if self.vectors is None or shape is None or not self.pqr_iter or self.kind == "bn":
            return
        op = self._operator(shape)
        partners = self._joint_partners(op)
        rs = power_qr_many(
            [op] + [w._operator(op.input_shape) for w in partners],
            [self.vectors] + [w.vectors for w in partners],
            n_iter=self.pqr_iter,
        )
        for w, r in zip([self] + partners, rs):
            assert w.vectors is not None  # partners are wrappers that track (_joint_partners)
            w.vectors.copy_(r.right)
            w.sigma.copy_(r.values[0])
        for w in partners:
            w.schedule.mark_tracked()  # its own forward comes later in this one

    def _joint_partners(self, op: AffineOperator) -> list[SpectralNorm]:
        """Wrappers inside this composition whose operator starts with the same layer at
        the same input size (the conv of a Conv+BN pair): their per-step iteration
        shares this one's batched pass (:func:`fastclip.spectral.power_qr_many`)."""
        if self.kind != "composition" or not op._factors:
            return []
        first = op._factors[0][0]
        partners = []
        for w in self.inner_wrappers():
            if (
                w.kind in ("conv", "linear")
                and w.vectors is not None
                and not w.schedule.tracked()  # a driver's batched pass already refined it
                and w.shape == op.input_shape
                and w.pqr_iter == self.pqr_iter
            ):
                w_op = w._operator(op.input_shape)
                if w_op._factors and w_op._factors[0][0] is first:
                    partners.append(w)
        return partners

    # -- clip --------------------------------------------------------------------
    @torch.no_grad()
    def clip_(self) -> None:
        """Clip now (what the schedule calls). Needs the input shape of a first batch,
        except for batch norm."""
        inner = unwrap(self.module)
        check_finite(inner, f"SpectralNorm({self.identifier})")
        if self.kind == "bn":
            clamp_bn_(inner, self.clip)
            self.sigma.copy_(bn_singular_values(inner, k=1)[0])
            return
        if self.kind == "linear":
            clamp_linear_(inner, self.clip, return_values=False)
        if self.vectors is None:
            raise RuntimeError(
                f"SpectralNorm({self.identifier}) has not seen an input yet: "
                "run a training-mode forward pass before clipping"
            )
        if self.kind == "composition":
            self._clip_inner_first()
        step = ClipStep(self)
        # Host decisions in the step use r.top, sigma_1 as read back with Lanczos's
        # stopping rule: the clip step waits for the device once per check, not per decision.
        drive(step.run(inner), step.measure)

    def clip_begin_(self) -> ClipStep | None:
        """A clip step's start for a driver that makes the estimates of many wrappers
        together (:mod:`fastclip.batched`): what :meth:`clip_` does before its estimates
        (batch norm's clamp, a linear layer's exact clamp, the checks), then the step,
        whose :meth:`ClipStep.run` the driver runs; None when nothing is left to estimate
        (batch norm). A composition's inner layers are the driver's to clip first."""
        inner = unwrap(self.module)
        if self.kind == "bn" or self.vectors is None:
            self.clip_()  # (batch norm's closed form, or the error of a wrapper without input)
            return None
        check_finite(inner, f"SpectralNorm({self.identifier})")
        if self.kind == "linear":
            clamp_linear_(inner, self.clip, return_values=False)
        return ClipStep(self)

    def _clip_inner_first(self) -> None:
        """A composition runs its schedule before its inner layers do (the forward
        reaches them later), but it must be clipped last: an inner conv's clip after it
        would lower the composition below c again (and, with the clip through gamma
        only, it has no other way to reach the conv). So the inner clips run here, and
        their own schedule skips them in this step."""
        for w in self.inner_wrappers():
            if (
                w.clip_flag
                and w.kind in ("conv", "linear")
                and w.vectors is not None
                and not w.schedule.clipped()
            ):
                w.clip_()
                w.schedule.mark_clipped()


def _config_property(name: str) -> property:
    def get(self: SpectralNorm) -> Any:
        return getattr(self.config, name)

    def set_(self: SpectralNorm, value: Any) -> None:
        self.config = self.config.replace(**{name: value})

    return property(get, set_, doc=f"``config.{name}`` (setting it validates a new config).")


for _name in SpectralNormConfig.field_names():
    if _name != "clip_params":  # the wrapper's clip_params is the resolved names
        setattr(SpectralNorm, _name, _config_property(_name))


def _wrappers(model: nn.Module) -> list[SpectralNorm]:
    return [m for m in model.modules() if isinstance(m, SpectralNorm)]


@torch.no_grad()
def clip_all_(model: nn.Module) -> None:
    """Clip every clipping wrapper of ``model`` now, out of step (an epoch's end).

    Compositions go first: their clip starts with the clips of the wrappers inside
    them, which are then not clipped a second time. Wrappers that have not seen a batch
    yet, or whose ``init_delay`` has not passed, are skipped. The marks are for this
    one action, not for the next training step."""
    wrappers = [
        w
        for w in _wrappers(model)
        if w.clip_flag and (w.kind == "bn" or w.vectors is not None) and w.schedule.started()
    ]
    for w in sorted(wrappers, key=lambda w: w.kind != "composition"):
        if not w.schedule.clipped():
            w.clip_()
    for w in wrappers:
        w.schedule.release()


@torch.no_grad()
def track_all_(model: nn.Module) -> None:
    """Refine every wrapper's vectors once, as one training step does (batched partners
    share a pass), without counting a step."""
    wrappers = _wrappers(model)
    for w in wrappers:
        if not w.schedule.tracked():
            w.refine_()
    for w in wrappers:
        w.schedule.release()
