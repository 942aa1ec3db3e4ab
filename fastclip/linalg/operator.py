"""The linear part of an affine module as an operator: forward and adjoint products.

An *implicitly linear* module computes ``f(x) = A x + b`` without ever forming ``A``
(convolutions, dense layers, eval-mode batch norm and their compositions). Given the
per-sample input shape, :class:`AffineOperator` exposes

* ``matvec(X)  = A X``     = f(X) - f(0), one forward pass on a batch;
* ``rmatvec(Y) = A^T Y``   by reverse-mode autograd (a vector-Jacobian product);
* ``gram(X)    = A^T A X`` = d/dX 0.5 ||A X||^2, one forward + one backward pass.

Every spectral routine in the library is written against this operator, so one
iteration serves every layer type. The module is evaluated in eval mode (batch norm
uses its running statistics, wrappers pass through) and its train/eval flags are
restored afterwards; gradients are taken with respect to the input only, so the
module's parameters never receive ``.grad``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "AffineOperator",
    "BN_TYPES",
    "CONV_TYPES",
    "check_finite",
    "eval_mode",
    "gram_many",
    "module_device_dtype",
    "full_precision",
    "plain_layer_type",
    "unwrap",
]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s type: the spectral iterations run in the module's
    own precision (float32 for a float32 model) inside a ``torch.autocast`` region."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the module's first parameter or buffer (CPU/float32 if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


#: Every batch-norm layer type (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants): the
#: one definition the library's ``isinstance`` checks use.
BN_TYPES: tuple[type[nn.modules.batchnorm._BatchNorm], ...] = (nn.modules.batchnorm._BatchNorm,)
#: Every convolution type, transposed included.
CONV_TYPES: tuple[type[nn.modules.conv._ConvNd], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def unwrap(module: nn.Module) -> Any:
    """The layer inside a chain of :class:`fastclip.SpectralNorm` wrappers (``module``
    itself when it is not wrapped).

    Typed ``Any``: callers read the concrete layer's attributes (``weight``,
    ``running_var``, ``stride``) after checking its exact type, which a type checker does
    not follow (``nn.Module.__getattr__`` is typed ``Tensor | Module``).

    A wrapper is recognised by its class attribute ``_fastclip_wrapper`` and holds the
    wrapped layer in ``.module``; this module cannot import the wrapper (it sits below
    it), hence the marker.

    Example::

        >>> from fastclip import SpectralNorm
        >>> conv = nn.Conv2d(1, 4, 3)
        >>> unwrap(SpectralNorm(SpectralNorm(conv))) is conv
        True
    """
    layer: Any = module
    while getattr(layer, "_fastclip_wrapper", False) and isinstance(
        getattr(layer, "module", None), nn.Module
    ):
        layer = layer.module
    return layer


def check_finite(module: nn.Module, what: str | None = None) -> None:
    """Raise ``ValueError`` naming the parameters and buffers of ``module`` that hold NaN or
    inf entries (a diverged layer has no spectral norm; without this check it shows up as
    a false "not affine", an eigensolver error, or a silent NaN). One host read.

    Example::

        >>> lin = nn.Linear(3, 2)
        >>> _ = lin.weight.data.fill_(float("nan"))
        >>> check_finite(lin, "fc1")
        Traceback (most recent call last):
        ...
        ValueError: fc1 (Linear) has non-finite values: weight (6 NaN, 0 inf); a spectral norm needs finite weights
    """
    tensors = [
        (n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()
    ]
    if not tensors:
        return
    ok = torch.stack([t.detach().isfinite().all() for _, t in tensors])
    if bool(ok.all()):
        return
    bad = ", ".join(
        f"{n} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} inf)"
        for (n, t), fine in zip(tensors, ok.tolist())
        if not fine
    )
    name = f"{what} ({type(module).__name__})" if what else type(module).__name__
    raise ValueError(f"{name} has non-finite values: {bad}; a spectral norm needs finite weights")


#: The layers whose linear part has a closed form, when their forward is torch's own.
_PLAIN_TYPES: tuple[type[nn.Module], ...] = (
    *CONV_TYPES,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Identity,
)


def plain_layer_type(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class whose closed forms hold for ``module``: its class among conv,
    linear, batch norm and identity, also for a subclass that keeps torch's forward (e.g.
    ``NonDynamicallyQuantizableLinear``). None for a subclass with its own forward (a LoRA
    ``W x + B A x``), and for a parametrized layer (its weight is computed, in train mode
    with side effects, so it is measured through its forward in eval mode).

    Example::

        >>> class LoRA(nn.Linear):
        ...     def forward(self, x):
        ...         return super().forward(x) + x.sum(-1, keepdim=True)
        >>> plain_layer_type(nn.Linear(2, 2)), plain_layer_type(LoRA(2, 2))
        (<class 'torch.nn.modules.linear.Linear'>, None)
    """
    if parametrize.is_parametrized(module):
        return None
    t = type(module)
    for base in _PLAIN_TYPES:
        if issubclass(t, base):
            if t.forward is not base.forward:
                return None
            if issubclass(base, nn.modules.conv._ConvNd) and t._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
                return None
            return base
    return None


def _linear_factors(
    module: Any,
) -> list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """The linear part ``x -> A x`` of a module as a chain of ``(layer, A_layer)``
    factors, when it is one of the layers whose linear part is known in closed form:
    a bare Conv1d/2d/3d or Linear (its own forward without the bias), an eval-mode
    batch norm with running statistics (a per-channel scale), ``nn.Identity``, or an
    ``nn.Sequential`` of those (the chain of its factors, e.g. a Conv+BN pair). Else
    None, and the operator falls back to ``f(x) - f(0)``.

    Why: ``f(x) - f(0)`` needs a pass on zeros after every weight update (most of what
    per-step tracking of a small layer costs), and operators that start with the same
    layer can share its pass (:func:`gram_many`).
    """
    module = unwrap(module)
    kind = plain_layer_type(module)  # a subclass with its own forward has no closed form
    if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return [(module, lambda X: module._conv_forward(X, module.weight, None))]
    if kind is nn.Linear:
        return [(module, lambda X: F.linear(X, module.weight))]
    if kind is nn.Identity:
        return []
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and module.running_var is not None:

        def scale(X: torch.Tensor) -> torch.Tensor:
            s = module.running_var.add(module.eps).rsqrt()
            if module.weight is not None:
                s = s * module.weight
            return X * s.view(-1, *([1] * (X.dim() - 2)))

        return [(module, scale)]
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        factors = []
        for child in module:  # (iterating calls a module listed twice twice, as the forward does)
            f = _linear_factors(child)
            if f is None:
                return None
            factors += f
        return factors
    return None


class AffineOperator:
    """The linear part ``A(x) = module(x) - module(0)`` of an affine module at a fixed
    per-sample ``input_shape`` (no batch dimension).

    Args:
        module: the affine module. It is used as is (no copy) unless ``dtype`` or
            ``device`` differ from the module's own, in which case a converted copy
            is made once.
        input_shape: shape of one input, e.g. ``(3, 32, 32)`` for a Conv2d.
        dtype, device: compute in this dtype / on this device.
        check_affine: verify on random inputs that the module is affine
            (raises ``ValueError`` otherwise, e.g. when it contains a ReLU).
        closed_form: compute ``A x`` from the known linear part of bare conv, linear
            and batch-norm layers and ``nn.Sequential`` chains of them (no bias, no
            pass on zeros; see :func:`gram_many`) rather than as ``f(x) - f(0)``. The
            exact references in :mod:`fastclip.exact` turn it off, so that they do not
            share the code they check.

    Example::

        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> op = AffineOperator(conv, (3, 16, 16))
        >>> x = torch.randn(2, 3, 16, 16)
        >>> torch.allclose((op.gram(x) * x).sum(), (op.matvec(x) ** 2).sum(), rtol=1e-4)
        True
    """

    def __init__(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_affine: bool = False,
        closed_form: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        try:
            input_shape = tuple(int(d) for d in input_shape)
        except TypeError:
            raise ValueError(
                f"input_shape must be a sequence of ints (no batch dimension), got {input_shape!r}"
            ) from None
        if not input_shape or any(d <= 0 for d in input_shape):
            raise ValueError(
                f"input_shape must be non-empty positive sizes (no batch dimension), got {input_shape}"
            )
        mdev, mdtype = module_device_dtype(module)
        dtype = dtype or mdtype
        device = torch.device(device) if device is not None else mdev
        if dtype != mdtype or device != mdev:
            # Measuring in another precision or place must not touch the user's module.
            module = copy.deepcopy(module).to(device=device, dtype=dtype)
        self.module = module
        self._factors = _linear_factors(module) if closed_form else None
        self.dtype = dtype
        self.device = device
        self.input_shape = input_shape
        self.n = math.prod(input_shape)
        with torch.no_grad(), eval_mode(module), full_precision(device):
            try:
                zero = torch.zeros((1, *input_shape), dtype=dtype, device=device)
                out = module(zero)
            except Exception as e:  # noqa: BLE001 - re-raised with the shape that caused it
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(
                    f"input_shape {input_shape} does not fit {type(module).__name__}: {msg}"
                ) from None
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{type(module).__name__} returned {type(out).__name__}, expected a tensor")
        self.output_shape = tuple(out.shape[1:])
        self.m = math.prod(self.output_shape)
        self.passes = 0  # forward+backward passes on a batch (what iterations cost)
        if check_affine:
            self.check_affine()

    # -- products ----------------------------------------------------------------
    @property
    def offset(self) -> torch.Tensor:
        """``module(0)`` for the current weights, shape ``(1, *output_shape)``."""
        with torch.no_grad(), eval_mode(self.module), full_precision(self.device):
            return self.module(torch.zeros((1, *self.input_shape), dtype=self.dtype, device=self.device))

    def _forward(self, X: torch.Tensor) -> torch.Tensor:
        if self._factors is not None:
            for _, f in self._factors:
                X = f(X)
            return X
        # f(X) - f(0) from one pass on the batch and a zero row: nothing cached, so no
        # change of the weights (an optimizer step, a clip, an assignment through
        # ``.data``, which bumps no version counter) can leave a stale offset behind.
        out = self.module(torch.cat([X, X.new_zeros((1, *X.shape[1:]))]))
        return out[:-1] - out[-1:]

    def _as_input(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(device=self.device, dtype=self.dtype)
        if tuple(X.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected a batch of inputs of shape (b, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(X.shape)}"
            )
        return X

    def matvec(self, X: torch.Tensor) -> torch.Tensor:
        """``A X`` for a batch ``X`` of shape ``(b, *input_shape)``."""
        X = self._as_input(X)
        with torch.no_grad(), eval_mode(self.module), full_precision(self.device):
            return self._forward(X)

    def rmatvec(self, Y: torch.Tensor) -> torch.Tensor:
        """``A^T Y`` for a batch ``Y`` of shape ``(b, *output_shape)``, by autograd."""
        Y = Y.to(device=self.device, dtype=self.dtype)
        X = torch.zeros(
            (Y.shape[0], *self.input_shape), device=self.device, dtype=self.dtype, requires_grad=True
        )
        with torch.enable_grad(), eval_mode(self.module), full_precision(self.device):
            out = self._forward(X)
            (g,) = torch.autograd.grad(out, X, grad_outputs=Y)
        return g

    def _eval(self) -> contextlib.AbstractContextManager:
        # the closed-form factors do not depend on the train/eval flags
        return contextlib.nullcontext() if self._factors is not None else eval_mode(self.module)

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        """``A^T A X`` (gradient of 0.5 ||A X||^2): one forward and one backward pass."""
        return self.gram_and_image(X)[0]

    def gram_and_image(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``A^T A X``, ``A X``) from the same forward pass."""
        X = self._as_input(X).detach().requires_grad_(True)
        with torch.enable_grad(), self._eval(), full_precision(self.device):
            out = self._forward(X)
            (g,) = torch.autograd.grad(out, X, grad_outputs=out.detach())
        self.passes += 1
        return g, out.detach()

    # -- checks ------------------------------------------------------------------
    def check_affine(self, trials: int = 2, generator: torch.Generator | None = None) -> None:
        """Raise ``ValueError`` unless ``A(a x + b y) = a A x + b A y`` on random inputs."""
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        g = generator or torch.Generator(device="cpu").manual_seed(0)
        for _ in range(trials):
            x, y = (torch.randn((1, *self.input_shape), generator=g, dtype=torch.float64) for _ in range(2))
            a, b = 1.7, -0.6
            lhs = self.matvec(a * x + b * y).double()
            rhs = a * self.matvec(x).double() + b * self.matvec(y).double()
            scale = max(float(lhs.abs().max()), float(rhs.abs().max()), 1e-30)
            err = float((lhs - rhs).abs().max()) / scale
            if not math.isfinite(err) or err > tol:
                check_finite(self.module)  # (NaN weights are not "not affine": say what they are)
                raise ValueError(
                    f"{type(self.module).__name__} is not affine at input_shape {self.input_shape}: "
                    f"f(a x + b y) - f(0) differs from a (f(x) - f(0)) + b (f(y) - f(0)) by {err:.2e} "
                    "(relative); spectral norms are defined for affine maps only "
                    "(no ReLU or other nonlinearity inside)"
                )


def gram_many(ops: Sequence[AffineOperator], Xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[A_i^T A_i X_i]`` for several operators, the same as ``[op.gram(X) for ...]``.

    Operators whose linear parts start with the same layer at the same input shape
    share that layer's forward and backward pass on the concatenated batch: a conv and
    the Conv+BN pair around it (``A_2 = D A_1``) cost one batched pass instead of two,
    which is what wBN training tracks at every step. Each operator still counts one pass.

    Example::

        >>> pair = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        >>> ops = [AffineOperator(pair[0], (3, 16, 16)), AffineOperator(pair, (3, 16, 16))]
        >>> g_conv, g_pair = gram_many(ops, [torch.randn(1, 3, 16, 16), torch.randn(2, 3, 16, 16)])
    """
    if len(ops) != len(Xs):
        raise ValueError(
            f"gram_many needs one batch per operator, got {len(ops)} operators and {len(Xs)} batches"
        )
    out: list[torch.Tensor | None] = [None] * len(ops)
    groups: dict[tuple, list[int]] = {}
    chains = {}
    for i, op in enumerate(ops):
        if op._factors:
            chains[i] = op._factors
            key = (id(op._factors[0][0]), op.input_shape, op.dtype, op.device)
            groups.setdefault(key, []).append(i)
        else:
            out[i] = op.gram(Xs[i])
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = ops[idx[0]].gram(Xs[idx[0]])
            continue
        parts = [ops[i]._as_input(Xs[i]).detach() for i in idx]
        sizes = [p.shape[0] for p in parts]
        X = torch.cat(parts).requires_grad_(True)
        with torch.enable_grad(), full_precision(X.device):
            Y = chains[idx[0]][0][1](X)
            images = []
            for i, Yi in zip(idx, Y.split(sizes)):
                for _, f in chains[i][1:]:
                    Yi = f(Yi)
                images.append(Yi)
            (g,) = torch.autograd.grad(images, X, grad_outputs=[y.detach() for y in images])
        for i, gi in zip(idx, g.split(sizes)):
            out[i] = gi
            ops[i].passes += 1
    return out  # type: ignore[return-value]
