"""Spectral normalisation by the true operator norm, as a ``torch.nn.utils.parametrize``
parametrization.

:func:`torch.nn.utils.parametrizations.spectral_norm` divides a convolution's kernel by
the largest singular value of the kernel reshaped to ``(c_out, c_in k ...)``. That
matrix is not the convolution: with padding, stride, dilation or groups the layer's
operator norm can be well above or below 1 after the division. :func:`spectral_norm`
here has the same interface and mechanics (power iterations warm-started from vectors
kept in buffers, ``sigma = <u, A v>`` differentiable in the weight, eval mode without
iterations), but ``A`` is the layer itself, ``x -> layer(x) - bias``, at the layer's
input size: its forward and its adjoint.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from fastclip.parametrizations import spectral_norm
    >>> conv = spectral_norm(nn.Conv2d(3, 8, 3, padding=1, stride=2), input_shape=(3, 16, 16))
    >>> y = conv(torch.randn(4, 3, 16, 16))                     # one power iteration
    >>> round(float(conv.parametrizations.weight[0].sigma), 3) > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp
from torch.nn.utils import parametrize

from fastclip.linalg.operator import CONV_TYPES, AffineOperator, full_precision
from fastclip.spectral import lanczos

__all__ = ["spectral_norm", "OperatorSpectralNorm", "LinearMap", "SUPPORTED"]

#: The layer types :func:`spectral_norm` accepts.
SUPPORTED: tuple[type, ...] = (nn.Linear, *CONV_TYPES)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class LinearMap:
    """``(x, W) -> A_W x``: a layer's bias-free forward with its weight passed in.

    It keeps the layer's hyperparameters, not the layer (a parametrization that held
    its own module would make the module its own descendant). Plain attributes only,
    so it pickles and deep-copies with the model. A transposed convolution uses its
    ``output_padding`` attribute (a forward called with ``output_size`` may differ).
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, SUPPORTED):
            names = ", ".join(t.__name__ for t in SUPPORTED)
            raise TypeError(f"spectral_norm supports {names}; got {type(module).__name__}")
        self.kind = type(module).__name__
        if isinstance(module, nn.Linear):
            self.dims = 0
            self.in_channels = module.in_features
            return
        conv: Any = module
        self.dims = len(conv.kernel_size)
        self.in_channels = conv.in_channels
        self.transposed = bool(conv.transposed)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = int(conv.groups)
        # a tuple, or "same"/"valid", which F.conv* take as they are
        self.padding: Any = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.output_padding = tuple(conv.output_padding)
        self.padding_mode = conv.padding_mode
        self.pad = tuple(conv._reversed_padding_repeated_twice)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.dims == 0:
            return F.linear(x, weight)
        if self.transposed:
            return _CONV_T[self.dims](
                x, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        if self.padding_mode != "zeros":
            # the module's own order: pad in its mode, then an unpadded convolution
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return _CONV[self.dims](x, weight, None, self.stride, 0, self.dilation, self.groups)
        return _CONV[self.dims](x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def check_shape(self, input_shape: tuple[int, ...], weight: torch.Tensor) -> tuple[int, ...]:
        """The output shape at ``input_shape``, or ``ValueError`` naming the shape."""
        expected = (
            f"(in_features,) = ({self.in_channels},)"
            if self.dims == 0
            else f"{self.dims + 1} sizes (channels, {'x'.join(['size'] * self.dims)}) "
            f"with {self.in_channels} channels"
        )
        if (
            len(input_shape) != max(self.dims + 1, 1)
            or input_shape[0 if self.dims else -1] != self.in_channels
        ):
            raise ValueError(
                f"input_shape {input_shape} does not fit {self.kind}: expected {expected}, no batch dimension"
            )
        try:
            with torch.no_grad():
                out = self(torch.zeros((1, *input_shape), dtype=weight.dtype, device=weight.device), weight)
        except RuntimeError as e:
            raise ValueError(
                f"input_shape {input_shape} does not fit {self.kind}: {str(e).splitlines()[0]}"
            ) from None
        return tuple(out.shape[1:])


class _Applied(nn.Module):
    """``x -> A_W x`` for a fixed weight, as a module the library's operator accepts."""

    weight: torch.Tensor

    def __init__(self, linear_map: LinearMap, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear_map = linear_map
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_map(x, self.weight)


#: Power iterations an eval forward may run to find sigma_1 of a weight changed since the
#: last training forward (it stops once sigma moves by less than 1e-6, relative).
_EVAL_ITERATIONS = 50


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


class OperatorSpectralNorm(nn.Module):
    """The parametrization :func:`spectral_norm` registers: ``W -> W / sigma`` (or
    ``W / max(1, sigma / clip)``), ``sigma`` the operator norm of ``x -> A_W x`` at
    ``input_shape``.

    Buffers: ``_u`` ``(1, *output_shape)`` and ``_v`` ``(1, *input_shape)``, the warm-started
    singular vectors, and ``sigma`` (the last estimate), all float32 (float64 for a
    float64 weight). Before the input shape is known they are empty; loading a state
    dict sizes them.
    """

    _u: torch.Tensor
    _v: torch.Tensor
    sigma: torch.Tensor

    def __init__(
        self,
        linear_map: LinearMap,
        n_power_iterations: int = 1,
        clip: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.linear_map = linear_map
        self.n_power_iterations = n_power_iterations
        self.clip = clip
        self.eps = eps
        self.input_shape: tuple[int, ...] | None = None
        self.register_buffer("_u", torch.empty(0))
        self.register_buffer("_v", torch.empty(0))
        self.register_buffer("sigma", torch.ones((), dtype=torch.float32))
        # (weight key, sigma) of the last eval forward's weight: see _eval_sigma
        self._eval_cache: tuple[tuple, torch.Tensor] | None = None

    @staticmethod
    def _vector_dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, input_shape: Sequence[int]) -> None:
        """Fix the input shape and start the vectors at the converged top singular pair
        (block Lanczos, :func:`fastclip.spectral.lanczos`), so the first forward is exact."""
        input_shape = tuple(int(d) for d in input_shape)
        dtype = self._vector_dtype(weight)
        W = weight.detach().to(dtype)
        if not bool(W.isfinite().all()):
            raise ValueError(
                f"spectral_norm on {self.linear_map.kind}: the weight has {int(W.isnan().sum())} NaN and "
                f"{int(W.isinf().sum())} inf entries; a spectral norm needs finite weights"
            )
        self.linear_map.check_shape(input_shape, W)
        op = AffineOperator(_Applied(self.linear_map, W), input_shape)
        generator = torch.Generator(device=W.device).manual_seed(0)  # the same start on every rank
        r = lanczos(op, k=1, generator=generator, with_left=True)
        self.input_shape = input_shape
        self._v = r.right[:1].to(dtype).contiguous()
        u = r.left[:1] if r.left is not None else op.matvec(self._v)
        self._u = _normalize(u.to(dtype), self.eps).contiguous()
        self.sigma = r.values[0].to(dtype).reshape(())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Size the vectors from the checkpoint: a model built without input_shape loads one
        # trained with it (the shape is the vector's, without the batch dimension).
        v = state_dict.get(prefix + "_v")
        if v is not None and v.numel():
            self._u = torch.empty_like(state_dict[prefix + "_u"], device=self.sigma.device)
            self._v = torch.empty_like(v, device=self.sigma.device)
            self.sigma = torch.empty_like(state_dict[prefix + "sigma"], device=self.sigma.device)
            self.input_shape = tuple(v.shape[1:])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.input_shape is None:
            raise RuntimeError(
                f"spectral_norm on {self.linear_map.kind}: the input shape is unknown; pass "
                "input_shape= or run one forward of the layer before reading its weight"
            )
        dtype = self._vector_dtype(weight)
        with full_precision(weight.device):
            W = weight.to(dtype)
            if self.training:
                self._power_iterations(W.detach())
                # sigma = <u, A v>: differentiable in the weight, as in torch
                sigma = torch.sum(self._u.to(dtype) * self.linear_map(self._v.to(dtype), W))
                with torch.no_grad():
                    self.sigma.copy_(sigma)
            else:
                sigma = self._eval_sigma(weight, W)
            if self.clip is None:
                scale = sigma.clamp_min(self.eps)
            else:
                scale = torch.clamp(sigma / self.clip, min=1.0)
            return (W / scale).to(weight.dtype)

    @torch.no_grad()
    def _eval_sigma(self, weight: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """sigma_1 of the current weight for an eval forward, without writing a buffer.

        The buffers hold the vectors of the last training forward; an optimizer step since
        then (evaluation right after a step) moved the weight, and dividing by the old sigma
        would leave the layer above 1 (Adam lr 0.1: 1.37). Power iterations from the stored
        vectors on copies, to convergence, once per value of the weight (its storage and
        version counter; recomputed every call under torch.compile)."""
        key = (weight.data_ptr(), weight._version, W.dtype)
        compiling = torch.compiler.is_compiling()
        if not compiling and self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        u, v = self._u.to(W.dtype), self._v.to(W.dtype)
        sigma = torch.sum(u * self.linear_map(v, W))
        for i in range(_EVAL_ITERATIONS):
            Av, adjoint = vjp(lambda x: self.linear_map(x, W), v)[:2]
            u = _normalize(Av, self.eps)
            v = _normalize(adjoint(u)[0], self.eps)
            new = torch.sum(u * self.linear_map(v, W))
            # (a host read per iteration, once per weight value: evaluation is not the hot path)
            if not compiling and i >= 1 and abs(float(new) - float(sigma)) <= 1e-6 * abs(float(new)):
                sigma = new
                break
            sigma = new
        if not compiling:
            self._eval_cache = (key, sigma)
        return sigma

    @torch.no_grad()
    def _power_iterations(self, W: torch.Tensor) -> None:
        # u <- A v / |A v|, v <- A^T u / |A^T u|, in place in the buffers (DDP and
        # torch.compile see the same tensors every step).
        # (the buffers are float32 unless model.half() or .to(dtype) converted them since)
        u, v = self._u.to(W.dtype), self._v.to(W.dtype)
        for _ in range(self.n_power_iterations):
            Av, adjoint = vjp(lambda x: self.linear_map(x, W), v)[:2]  # (no auxiliary output)
            u = _normalize(Av, self.eps)
            v = _normalize(adjoint(u)[0], self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # assigning module.weight stores the value as given (as torch's spectral_norm does)
        return weight

    def extra_repr(self) -> str:
        return (
            f"{self.linear_map.kind}, input_shape={self.input_shape}, "
            f"n_power_iterations={self.n_power_iterations}, clip={self.clip}"
        )


def _check_positive(what: str, value: Any, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        expected = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{what} must be {expected}, got {value!r}")


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    input_shape: Sequence[int] | None = None,
    n_power_iterations: int = 1,
    clip: float | None = None,
    eps: float = 1e-12,
) -> nn.Module:
    """Normalise ``module.<name>`` by the layer's operator norm at its input size.

    Registers an :class:`OperatorSpectralNorm` parametrization through
    :func:`torch.nn.utils.parametrize.register_parametrization` (as
    :func:`torch.nn.utils.parametrizations.spectral_norm` does) and returns ``module``.
    The norm is that of the whole layer ``x -> A x`` (convolution with its padding mode,
    stride, dilation and groups; transposed convolution; dense layer), not of the
    reshaped kernel.

    Args:
        module: ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``.
        name: the weight parameter's name.
        input_shape: one input's shape without the batch dimension, e.g. ``(3, 32, 32)``.
            When omitted it is taken from the first forward (run that one eagerly, before
            ``torch.compile``). ``nn.Linear`` needs none (its norm does not depend on it).
        n_power_iterations: power iterations per training forward, warm-started from the
            previous ones; the vectors start at the converged top singular pair.
        clip: ``None`` divides by sigma (torch's behaviour, norm 1); ``c`` divides by
            ``max(1, sigma / c)`` (norm at most ``c``; a weight already below is left).
        eps: floor of the norms divided by.

    Training mode runs the iterations and stores ``sigma``; eval mode divides by the sigma
    of the current weight (power iterations from the stored vectors, on copies, once per
    weight value) and writes no buffer. Vectors and sigma are float32 (float64 for a
    float64 weight) and computed with autocast off, so bf16/fp16 autocast is safe.
    ``parametrize.remove_parametrizations(module, name, leave_parametrized=True)`` leaves
    the normalised weight. Under ``torch.compile`` the training steps reuse one graph (the
    vectors are updated in place); the first switch to eval mode, or to ``no_grad``, compiles
    once more each; the one-time set-up of a first forward that fixes the input shape runs
    eagerly (``torch.compiler.disable``).
    Under DDP the vectors start from the same seed on every rank and are broadcast with
    the module's other buffers.

    Raises:
        TypeError: ``module`` is not one of the supported layers.
        ValueError: no parameter ``name``, ``name`` already parametrized, an ``input_shape``
            the layer does not accept, or a non-positive ``clip``, ``n_power_iterations`` or ``eps``.

    Example::

        >>> from torch import nn
        >>> layer = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), input_shape=(3, 16, 16))
        >>> type(layer.parametrizations.weight[0]).__name__
        'OperatorSpectralNorm'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm needs an nn.Module, got {type(module).__name__}")
    if parametrize.is_parametrized(module, name):
        plist: Any = getattr(module.parametrizations, name)  # (a ParametrizationList)
        present = ", ".join(type(q).__name__ for q in plist)
        raise ValueError(
            f"{type(module).__name__}.{name} is already parametrized ({present}); remove it first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}))"
        )
    linear_map = LinearMap(module)
    params = dict(module.named_parameters(recurse=False))
    if name not in params:
        raise ValueError(
            f"{type(module).__name__} has no parameter {name!r}; expected one of {sorted(params)}"
        )
    _check_positive("n_power_iterations", n_power_iterations, integer=True)
    _check_positive("eps", eps)
    if clip is not None:
        _check_positive("clip", clip)
    weight = params[name]
    parametrization = OperatorSpectralNorm(linear_map, n_power_iterations, clip, eps).to(weight.device)
    if isinstance(module, nn.Linear):
        input_shape = (module.in_features,)
    if input_shape is not None:
        try:
            shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError):
            raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
        parametrization.initialize(weight, shape)
        parametrize.register_parametrization(module, name, parametrization)
        return module
    # The first forward fixes the input shape; until then the parametrization cannot run.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    handle: Any = None

    @torch.compiler.disable  # one-time set-up (Lanczos): not worth tracing
    def first_input(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        batched = x.dim() == linear_map.dims + 2
        parametrization.initialize(
            cast(Any, mod).parametrizations[name].original, tuple(x.shape[1:] if batched else x.shape)
        )
        handle.remove()

    handle = module.register_forward_pre_hook(first_input)
    return module
