"""Clipping the spectral norm of an affine module in place (FastClip).

For a layer ``A_theta`` with top singular triple ``(sigma_1, u_1, v_1)`` and target ``c``,
FastClip (Ebrahimpour-Boroojeny et al. 2024) updates only the weights, to minimise

    L(theta) = sum_i || A_theta(v_i) - t_i ||^2,    t_i = min(sigma_i, c) / sigma_i * A_0(v_i)
                                                        = min(sigma_i, c) u_i,

i.e. it maps the top directions onto ``c u_i`` (those above ``c``) or keeps them where
they are (those below), and leaves other directions alone as far as the weights allow.
``A_theta(v)`` is linear in a convolution's kernel (bilinear in (kernel, gamma) for a
Conv+BN composition), so each update is a Gauss-Newton least-squares step, solved by
CGLS on the Jacobian products (forward-mode for ``J d``, reverse-mode for ``J^T y``)
starting from zero, which yields the minimum-norm weight change. One CGLS iteration is
a gradient step with exact line search; the published fixed step size is available as
``line_search=False``.

Closed forms where they exist: ``Linear`` clamps the singular values of ``W`` (exact
rank-r update ``W <- W - sum_{sigma_i > c} (sigma_i - c) u_i v_i^T``); batch norm clamps
gamma (:func:`fastclip.linalg.batchnorm.clamp_bn_`).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn.utils import parametrize

from fastclip.linalg.batchnorm import clamp_bn_
from fastclip.linalg.operator import (
    BN_TYPES,
    AffineOperator,
    check_finite,
    eval_mode,
    full_precision,
    module_device_dtype,
    plain_layer_type,
    unwrap,
)
from fastclip.spectral import lanczos

__all__ = ["clip_spectral_norm_", "fit_directions_", "clamp_linear_", "weight_parameters"]

log = logging.getLogger(__name__)


def weight_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters FastClip may change: those named ``*weight`` (biases do not
    affect the linear part)."""
    return {n: p for n, p in module.named_parameters() if n.split(".")[-1] == "weight" and p.requires_grad}


def _linear_part(module: nn.Module, params: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    both = torch.cat([X, torch.zeros_like(X[:1])])
    out = functional_call(module, params, (both,))
    return out[:-1] - out[-1:]


_LINEAR_IN_WEIGHT = (nn.modules.conv._ConvNd, nn.Linear, *BN_TYPES)


def _enters_linearly(module: nn.Module, names: Sequence[str]) -> bool:
    """Whether the linear part of ``module`` is linear in the parameters ``names``
    (not only affine or bilinear): true when they all belong to one conv, linear or
    batch-norm layer, whose linear part scales with its weight, because the rest of an
    affine module only composes that layer with fixed affine maps."""
    owners = {n.rpartition(".")[0] for n in names}
    if len(owners) != 1 or any(n.rpartition(".")[2] != "weight" for n in names):
        return False
    owner = module.get_submodule(owners.pop())
    # (a subclass with its own forward, e.g. W x + B A x, is only affine in W)
    kind = plain_layer_type(owner)
    return kind is not None and issubclass(kind, _LINEAR_IN_WEIGHT)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, [(x * y).sum() for x, y in zip(a, b)])


@torch.no_grad()
def fit_directions_(
    module: nn.Module,
    V: torch.Tensor,
    targets: torch.Tensor,
    n_iter: int = 5,
    *,
    line_search: bool = True,
    stepsize: float = 0.35,
    params: dict[str, nn.Parameter] | None = None,
    return_loss: bool = True,
) -> float | None:
    """Move ``module``'s weights so that its linear part maps ``V[i]`` to ``targets[i]``
    (least squares), in place. Returns the final loss ``sum ||A V - T||^2``.

    ``line_search=True``: ``n_iter`` CGLS iterations on the Gauss-Newton system
    ``J delta = T - A V`` from ``delta = 0`` (the first is a gradient step with exact
    line search). ``line_search=False``: ``n_iter`` plain gradient steps of size
    ``stepsize`` on the published loss scaling (sum over all output axes but the last,
    mean over the last axis and the batch).

    When the linear part is linear in the fitted weights (they all belong to one conv,
    linear or batch-norm layer: the default for a conv and, with batch norm's gamma, for
    a Conv+BN composition) the Jacobian product ``J p`` is the linear part evaluated at
    weights ``p``, one plain forward pass instead of a forward-mode one.

    No host sync: CGLS's stops (``gamma <= 0``, ``q^T q <= 0``: an exact fit) are taken
    on the device (the step size becomes 0 from then on, which leaves the weights as a
    stop would). ``return_loss=False`` skips the final loss (a forward pass and a
    read) and returns None.
    """
    params = params if params is not None else weight_parameters(module)
    names = list(params)
    theta = tuple(params[n].detach() for n in names)
    V = V.to(theta[0].dtype)
    targets = targets.to(theta[0].dtype)

    def A(*th: torch.Tensor) -> torch.Tensor:
        return _linear_part(module, dict(zip(names, th)), V)

    linear = _enters_linearly(module, names)
    with eval_mode(module), torch.enable_grad(), full_precision(V.device):
        if not line_search:
            scale = 1.0 / (V.shape[0] * (targets.shape[-1] if targets.dim() > 2 else 1))
            for _ in range(n_iter):
                th = tuple(t.clone().requires_grad_(True) for t in theta)
                step_loss = ((A(*th) - targets) ** 2).sum() * scale
                grads = torch.autograd.grad(step_loss, th)
                theta = tuple(t - stepsize * g for t, g in zip(theta, grads))
        else:
            out, pullback = vjp(A, *theta)[:2]  # (no auxiliary output)
            r = targets - out
            s = pullback(r)
            p = s
            gamma = _dot(s, s)
            delta = tuple(torch.zeros_like(t) for t in theta)
            alive = torch.ones((), dtype=torch.bool, device=gamma.device)
            for _ in range(n_iter):
                alive = alive & (gamma > 0)
                if linear:
                    with torch.no_grad():
                        q = A(*p)
                else:
                    q = jvp(A, theta, p)[1]
                qq = _dot([q], [q])
                alive = alive & (qq > 0)
                alpha = torch.where(
                    alive, gamma / torch.where(alive, qq, torch.ones_like(qq)), torch.zeros_like(qq)
                )
                delta = tuple(d + alpha * pi for d, pi in zip(delta, p))
                r = r - alpha * q
                s = pullback(r)  # J^T r at the linearisation point (Gauss-Newton)
                gamma_new = _dot(s, s)
                beta = torch.where(
                    alive,
                    gamma_new / torch.where(alive, gamma, torch.ones_like(gamma)),
                    torch.zeros_like(gamma),
                )
                p = tuple(si + beta * pi for si, pi in zip(s, p))
                gamma = torch.where(alive, gamma_new, gamma)
            theta = tuple(t + d for t, d in zip(theta, delta))
        loss = float(((A(*theta) - targets) ** 2).sum().detach()) if return_loss else None
    for n, t in zip(names, theta):
        params[n].copy_(t)
    return loss


@torch.no_grad()
def clamp_linear_(
    linear: nn.Linear, max_norm: float, return_values: bool = True
) -> tuple[float, float] | None:
    """Exact clip of a Linear layer: singular values of W above ``max_norm`` become
    ``max_norm``, the rest of the SVD is untouched. Returns sigma_1 before and after
    (``return_values=False``: None, and no host read)."""
    W = linear.weight
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    W.copy_((U * S.clamp(max=max_norm)) @ Vh)
    if not return_values:
        return None
    before = float(S[0])
    return before, min(before, float(max_norm))


def clip_spectral_norm_(
    module: nn.Module,
    input_shape: Sequence[int],
    max_norm: float,
    *,
    block: int = 8,
    max_rounds: int = 100,
    inner_iter: int = 10,
    upper: float = 1.01,
    check_affine: bool = True,
) -> tuple[float, float]:
    """Clip the spectral norm of ``x -> module(x) - module(0)`` at ``input_shape`` to
    ``max_norm``, in place. Returns ``(sigma_1 before, sigma_1 after)``.

    A module already at or below ``max_norm`` is left unchanged. Otherwise its exact
    sigma_1 ends in ``[0.95 max_norm, upper * max_norm]``:

    * ``nn.Linear``: exact SVD clamp of the weight;
    * batch norm (eval statistics): exact gamma clamp;
    * convolutions and compositions (e.g. Conv+BN, updating both weights): rounds of
      FastClip on every singular direction found above ``max_norm`` (block Lanczos with
      blocks of ``block`` vectors, warm started), each a least-squares fit
      (:func:`fit_directions_`, ``inner_iter`` CGLS iterations), until the measured
      sigma_1 is within the band. If ``max_rounds``
      do not reach it, the remaining excess is removed by scaling the first weight
      (exact for maps linear in it) and a warning is logged.

    Example::

        >>> conv = nn.Conv2d(16, 16, 3, padding=1)
        >>> before, after = clip_spectral_norm_(conv, (16, 12, 12), 1.0)
    """
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    inner = unwrap(module)
    for name, sub in inner.named_modules():
        if parametrize.is_parametrized(sub):
            where = f"{type(inner).__name__}" + (f" ({name})" if name else "")
            raise ValueError(
                f"{where} has a parametrization on {', '.join(sub.parametrizations)}: its weight is "
                "computed from the parametrization's input at every use, so an in-place clip of it "
                "would not hold; remove the parametrization (torch.nn.utils.parametrize."
                "remove_parametrizations) or clip the tensor it computes from"
            )
    check_finite(inner)
    _, mdtype = module_device_dtype(inner)
    if mdtype in (torch.float16, torch.bfloat16):
        return _clip_in_float32(
            inner,
            input_shape,
            max_norm,
            mdtype,
            block=block,
            max_rounds=max_rounds,
            inner_iter=inner_iter,
            upper=upper,
            check_affine=check_affine,
        )
    kind = plain_layer_type(inner)
    if kind is not None and issubclass(kind, BN_TYPES):
        op = AffineOperator(inner, input_shape)  # validates the shape
        del op
        return clamp_bn_(inner, max_norm)  # (measures gamma's new scale)
    if kind is nn.Linear and tuple(input_shape)[-1:] == (inner.in_features,):
        AffineOperator(inner, input_shape)
        values = clamp_linear_(inner, max_norm)
        assert values is not None  # return_values=True
        if values[0] <= max_norm:
            return values
        # what the clamp left, measured: the SVD of the written weight
        after = float(torch.linalg.matrix_norm(inner.weight.detach().double(), ord=2))
        return values[0], after
    op = AffineOperator(inner, input_shape, check_affine=check_affine)
    params = weight_parameters(inner)
    if not params:
        raise ValueError(f"{type(inner).__name__} has no trainable parameter named '*weight' to clip")
    b = max(1, min(block, op.n - 1, op.m - 1))
    # Every Ritz direction found above max_norm is fitted in the same round: the top of
    # a conv's spectrum is often flat, and fitting a few at a time uncovers the next.
    r = lanczos(op, k=1, block=b, min_value=max_norm)
    before = float(r.values[0])
    if before <= max_norm:
        return before, before
    sigma1 = before
    for _ in range(max_rounds):
        c = torch.clamp(r.values, max=max_norm).to(r.left.dtype)
        targets = r.left * c.view(-1, *([1] * (r.left.dim() - 1)))
        fit_directions_(inner, r.right, targets, n_iter=inner_iter, params=params)
        # The next estimate warm-starts from the top directions just fitted.
        # (plus a random vector and 5 passes: the fitted directions span a nearly
        # invariant subspace, on which Lanczos alone would stop below sigma_1)
        r = lanczos(op, k=1, block=b, X=r.right[:b], min_value=max_norm, extra_random=1, min_passes=5)
        sigma1 = float(r.values[0])
        if sigma1 <= upper * max_norm:
            break
    else:
        first = next(iter(params.values()))
        log.warning(
            "clip_spectral_norm_: %d rounds left sigma_1 = %.4g > %.4g; scaling the weight",
            max_rounds,
            sigma1,
            max_norm,
        )
        with torch.no_grad():
            first.mul_(max_norm / sigma1)
        sigma1 = float(lanczos(op, k=1, tol=1e-7).values[0])
    return before, sigma1


def _clip_in_float32(
    inner: nn.Module, input_shape: Sequence[int], max_norm: float, dtype: torch.dtype, **kwargs
) -> tuple[float, float]:
    """A half-precision layer clipped through a float32 copy (its kernels are missing on the
    CPU, and Lanczos needs more digits), the result written back in ``dtype`` and measured
    there: the rounding may move sigma_1 by a few units of ``dtype``'s precision."""
    log.info("clip_spectral_norm_: %s has %s weights; clipped in float32", type(inner).__name__, dtype)
    work = copy.deepcopy(inner).float()
    before, _ = clip_spectral_norm_(work, input_shape, max_norm, **kwargs)
    with torch.no_grad():
        for (_, p), (_, q) in zip(inner.named_parameters(), work.named_parameters()):
            p.copy_(q)
    with eval_mode(inner):
        after = float(lanczos(AffineOperator(inner, input_shape, dtype=torch.float32), k=1).values[0])
    return before, after
