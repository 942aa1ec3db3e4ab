"""``lip4conv``: the Gram-iteration bound as a differentiable penalty (Delattre et al. 2023).

For a circular 2-D convolution on H x W, the operator is block diagonal in the Fourier
basis with blocks ``K_hat[f]`` (c_out x c_in). For any matrix G, the Gram iterates
``G_0 = G, G_{t+1} = G_t^H G_t`` satisfy ``sigma_1(G_t) = sigma_1(G)^(2^t)`` and
``sigma_1 <= ||.||_F``, hence

    sigma_1(G) <= ||G_t||_F^(1 / 2^t),

a bound that tightens doubly exponentially in t. The entries grow like
sigma_1^(2^t), so each iterate is rescaled by its Frobenius norm and the logarithm of
the scale carried along: with ``H_t`` the stored (normalised) iterate, ``n_t = ||H_t||_F``,
``H_{t+1} = (H_t/n_t)^H (H_t/n_t)`` and ``L_{t+1} = 2 (L_t + log n_t)``,
``||G_T||_F = e^{L_T} ||H_T||_F``. The bound of the convolution is the maximum over
frequencies. The loss penalty is ``weight * sum_convs relu(bound - c)``.

Only half the frequencies are iterated: a real kernel's spectrum is conjugate
symmetric (``K_hat[-f] = conj(K_hat[f])``, same singular values). The smaller of c_in,
c_out is used for the Gram matrices (a transpose changes no singular value).
Strides are ignored by default as in the published baseline (the stride-1 bound is
still an upper bound of the strided conv, but a loose one); ``polyphase=True`` bounds
the strided operator itself (:func:`fastclip.pipeline.methods.nsedghi.polyphase_kernel`).
Groups are bounded block by block; linear layers are not penalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastclip.linalg.fourier import kernel_fft
from fastclip.pipeline.methods.base import Method, MethodConfig, named_layers
from fastclip.pipeline.methods.nsedghi import conv_circular_geometry, polyphase_kernel

__all__ = ["Lip4Conv", "Lip4ConvConfig", "gram_iteration_bound", "conv_bound"]


@dataclass
class Lip4ConvConfig(MethodConfig):
    weight: float = field(default=0.1, metadata={"help": "penalty coefficient: weight * sum relu(bound - c)"})
    n_iter: int = field(default=6, metadata={"help": "Gram iterations of the bound", "range": (1, 100)})
    polyphase: bool = field(
        default=False,
        metadata={
            "help": "bound strided convs by their polyphase form (tight) instead of ignoring the stride "
            "(the published baseline)"
        },
    )


def gram_iteration_bound(
    weight: torch.Tensor, input_size: tuple[int, int], n_iter: int = 6, dilation: int | tuple[int, int] = 1
) -> torch.Tensor:
    """Upper bound on sigma_1 of the stride-1 circular conv with kernel ``weight``
    (c_out, c_in, kh, kw) on ``input_size`` = (H, W): max over frequencies of
    ``||G_T||_F^(1 / 2^T)`` after T = ``n_iter`` Gram iterations (rescaled in log space).
    A 0-dim tensor, differentiable with respect to ``weight``.

    Example::

        >>> w = torch.randn(16, 8, 3, 3)
        >>> gram_iteration_bound(w, (12, 12))   # >= circular_singular_values(w, (12, 12), k=1)
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    cout, cin = weight.shape[:2]
    F = kernel_fft(weight, input_size, dilation)  # (H, W, cout, cin)
    W = F.shape[1]
    G = F[:, : W // 2 + 1].reshape(-1, cout, cin)
    if cin > cout:
        G = G.mH
    tiny = torch.finfo(weight.dtype).tiny
    # Start from G / max|G|: the Frobenius norm squares entries, which would overflow
    # (or underflow) for extreme kernels; afterwards every iterate has norm <= 1.
    amax = G.abs().amax(dim=(-2, -1)).detach().clamp_min(tiny)
    G = G / amax[:, None, None]
    log_scale = amax.log()
    for _ in range(n_iter):
        nrm = torch.linalg.matrix_norm(G).clamp_min(tiny)  # Frobenius, per frequency
        G = G / nrm[:, None, None]
        log_scale = 2 * (log_scale + nrm.log())
        G = G.mH @ G
    log_bound = (log_scale + torch.linalg.matrix_norm(G).clamp_min(tiny).log()) / 2**n_iter
    return log_bound.max().exp()


def conv_bound(
    conv: nn.Conv2d, input_shape: tuple[int, ...], n_iter: int = 6, polyphase: bool = False
) -> torch.Tensor:
    """:func:`gram_iteration_bound` of a Conv2d at its per-sample ``input_shape`` (C, H, W),
    groups block by block; strides ignored unless ``polyphase``. Differentiable."""
    _, H, W = (int(d) for d in input_shape)
    bounds = []
    for wg in conv.weight.chunk(conv.groups, dim=0):
        if polyphase:
            h, w = conv_circular_geometry(conv, input_shape)
            bounds.append(
                gram_iteration_bound(polyphase_kernel(wg, conv.stride, conv.dilation), (h, w), n_iter)
            )
        else:
            bounds.append(gram_iteration_bound(wg, (H, W), n_iter, tuple(conv.dilation)))
    return torch.stack(bounds).max()


class Lip4Conv(Method):
    """Adds ``weight * sum_convs relu(bound - c)`` to the loss (:meth:`penalty`), with the
    Gram-iteration bound of each 2-D conv at its real input size.

    Example::

        >>> m = Lip4Conv(mode="wBN")
        >>> model = m.prepare(model, (3, 32, 32))
        >>> loss = criterion(model(x), y) + m.penalty(model)
    """

    name = "lip4conv"
    Config = Lip4ConvConfig

    def __init__(self, mode: str = "wBN", **overrides: Any) -> None:
        super().__init__(mode=mode, **overrides)
        if self.config.n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {self.config.n_iter}")
        if self.config.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.config.weight}")

    def _convs(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return named_layers(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        model = super().prepare(model, input_shape, writer=writer)
        for name, conv in self._convs(model):
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(
                    f"method 'lip4conv' bounds nn.Conv2d only; layer {name!r} is {type(conv).__name__}"
                )
            if name not in self.input_shapes:
                raise ValueError(
                    f"conv {name!r} was not used in the forward pass at input shape {input_shape}; "
                    "its input size is unknown"
                )
            if self.config.polyphase:
                try:
                    conv_circular_geometry(conv, self.input_shapes[name])
                except ValueError as e:
                    raise ValueError(
                        f"method 'lip4conv' (polyphase) cannot bound layer {name!r}: {e}"
                    ) from None
        return model

    def bound(self, name: str, conv: nn.Conv2d) -> torch.Tensor:
        return conv_bound(conv, self.input_shapes[name], self.config.n_iter, self.config.polyphase)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``weight * sum relu(bound - c)`` over the convs (0-dim, differentiable)."""
        total = super().penalty(model)
        for name, conv in self._convs(model):
            total = total + torch.relu(self.bound(name, conv) - self.config.clip)
        return self.config.weight * total

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """The current Gram bound of every conv (computed now), and BN."""
        with torch.no_grad():
            norms = {name: float(self.bound(name, conv)) for name, conv in self._convs(model)}
        norms.update(super().layer_norms(model))
        return norms
