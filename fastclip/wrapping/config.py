"""The settings of a :class:`fastclip.SpectralNorm` wrapper, as one validated dataclass.

:class:`SpectralNormConfig` holds how a wrapper tracks and clips (the published
wrapper's keyword arguments and defaults, plus this project's additions); who it is
(``clip_flag``, ``identifier``) and where it logs (``summary``, ``writer``) stay
arguments of the wrapper. The same object is built by ``SpectralNorm(...)`` from its
keyword arguments and by the ``fastclip`` method (:mod:`fastclip.pipeline.methods.fastclip`) from
its hyper-parameters, and validated once, in ``__post_init__``: a wrong value is a
``ValueError`` (or ``TypeError``) that names the field, what it expects and what it got.

Example::

    >>> cfg = SpectralNormConfig(clip=1.0, clip_steps=100, init_delay=0)
    >>> conv = SpectralNorm(nn.Conv2d(1, 8, 3), config=cfg, identifier="conv1")
    >>> SpectralNormConfig(clip_steps=0)
    Traceback (most recent call last):
    ValueError: clip_steps must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SpectralNormConfig"]

#: Integer fields and their smallest allowed value.
_AT_LEAST = {
    "k": 1,
    "clip_steps": 1,
    "init_pqr_iter": 1,
    "summary_steps": 1,
    "clip_block": 1,
    "max_clip_rounds": 1,
    "init_delay": 0,
    "pqr_iter": 0,
    "clip_opt_iter": 0,
    "track_steps": 0,
    "deflate_iter": 0,
    "refine_iter": 0,
}


@dataclass(frozen=True)
class SpectralNormConfig:
    """How a :class:`fastclip.SpectralNorm` wrapper tracks and clips: the published
    wrapper's names and defaults, each field documented below it."""

    clip: float = 1.0
    """The target spectral norm ``c``."""
    k: int = 1
    """Number of singular vectors tracked."""
    clip_steps: int = 50
    """Clip every this many training steps ..."""
    init_delay: int = 500
    """... once this many steps have passed."""
    pqr_iter: int = 1
    """PowerQR iterations per training step (warm-started)."""
    init_pqr_iter: int = 100
    """PowerQR iterations from a random start on the first step."""
    track_steps: int = 1
    """Refine the vectors every this many steps (1: every step, the published wrapper);
    0: only at the steps that use them, clip steps and summary steps (``sigma`` then holds
    the value found there). The clip step's block Lanczos starts from the vectors either way."""
    clip_opt_iter: int = 5
    """Least-squares iterations per clip."""
    clip_opt_stepsize: float | None = None
    """Step for ``line_search=False``; None: 0.35, or 0.01 for a composition (the published
    values). The default exact line search does not use it."""
    deflate_iter: int = 1
    """Clip rounds per clip step, re-estimating the vectors between."""
    exact: bool = False
    """The authors' variant that also raises a convolution's sigma_1 to ``c`` when it is
    below ``c - 0.05`` (default: bound from above only)."""
    line_search: bool = True
    """Exact line search / CGLS (True) or fixed-step gradient steps."""
    refine_iter: int = 15
    """Pass budget of the estimate made at each clip step and after each clip round
    (published: 10 PowerQR iterations; here block Lanczos). Past it an estimate stops only
    once it proves sigma_1 above the 1.01 c band (the step fits again anyway); one whose
    value the wrapper keeps runs on to ``refine_tol``, up to 4 times the budget."""
    refine_tol: float = 1e-3
    """Its relative residual tolerance (on sigma_1)."""
    clip_block: int = 4
    """Lanczos block size of that estimate; every Ritz direction it finds above ``clip`` is
    fitted in the same round (the top of a conv's spectrum is often flat: fitting a few
    directions at a time only uncovers the next)."""
    max_clip_rounds: int = 10
    """After the ``deflate_iter`` rounds, keep fitting while the estimated sigma_1 exceeds
    ``1.01 clip``, up to this many rounds in all (a layer that drifted far above ``c``
    between clip steps needs several)."""
    summary_steps: int = 50
    """Write a scalar every this many steps (published: 50)."""
    clip_margin: float = 0.02
    """Directions found above ``clip`` are fitted to ``clip * (1 - clip_margin)``
    (published: to ``clip``, i.e. 0). The margin absorbs the part of the excess one
    least-squares fit leaves and the neighbours of the fitted directions, so fewer rounds
    reach the 1.01 c band."""
    rescale_above: float | None = 2.0
    """When a clip step finds sigma_1 above ``rescale_above * clip`` (the layer drifted far
    since the last clip), first scale the fitted weight by ``clip (1 - clip_margin) /
    sigma_1``: exact for a map linear in that weight (every singular value shrinks by the
    factor, the directions stay), where direction fits cannot get: a layer far above c has
    hundreds of directions above it. Fits follow only if the estimate had not converged or
    the result is still above ``1.01 clip``. 0 or None: never (the published clip)."""
    clip_params: str | tuple[str, ...] = "auto"
    """What a clip may change. ``"auto"``: for a composition that contains batch norm, BN's
    weight (gamma) only, otherwise every ``*weight``; ``"all"``: every ``*weight`` (the
    published update); or parameter names in the wrapped module without the wrappers'
    ``module.`` levels (e.g. ``("bn.weight",)``). Why gamma for a Conv+BN composition: batch
    norm's running variance follows the conv's output scale, so shrinking the conv is undone
    within ~1/momentum steps, and each clip shrinks the conv further while BN's scale grows
    to compensate; gamma's changes stay."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        for name, low in _AT_LEAST.items():
            value = _integer(name, getattr(self, name))
            set_(self, name, value)
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")
        for name in ("clip", "refine_tol", "clip_margin"):
            set_(self, name, _real(name, getattr(self, name)))
        if self.clip_opt_stepsize is not None:
            set_(self, "clip_opt_stepsize", _real("clip_opt_stepsize", self.clip_opt_stepsize))
        set_(self, "rescale_above", _real("rescale_above", self.rescale_above or 0.0))
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip!r}")
        if not self.refine_tol > 0:
            raise ValueError(f"refine_tol must be > 0, got {self.refine_tol!r}")
        if self.clip_opt_stepsize is not None and not self.clip_opt_stepsize > 0:
            raise ValueError(
                f"clip_opt_stepsize must be > 0 (or None: the published step), got {self.clip_opt_stepsize!r}"
            )
        if not 0 <= self.clip_margin < 1:
            raise ValueError(f"clip_margin must be in [0, 1), got {self.clip_margin!r}")
        if self.rescale_above and not self.rescale_above > 1:
            raise ValueError(f"rescale_above must be > 1 (or 0/None: never), got {self.rescale_above!r}")
        for name in ("exact", "line_search"):
            set_(self, name, bool(getattr(self, name)))
        set_(self, "clip_params", _clip_params(self.clip_params))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> SpectralNormConfig:
        """A copy with ``changes`` applied (validated again); an unknown name is a
        ``TypeError`` listing the fields."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown SpectralNorm setting(s) {', '.join(unknown)}; expected one of "
                f"{', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer()):
        return int(value)
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def _real(name: str, value: Any) -> float:
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def _clip_params(value: str | Sequence[str]) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value in ("auto", "all"):
            return value
    elif isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"clip_params must be 'auto', 'all' or a list of parameter names, got {value!r}")
