"""Layer-wise spectral norms of a trained model: sigma_1 of every conv, linear and Conv+BN
layer at the layer's true input size, as the model computes it in eval mode (what
``compute_trained_SVs.py`` tabulates and training logs; re-exported by
:mod:`fastclip.pipeline.results`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fastclip.analysis.discovery import canonical_layer_name, outermost_name
from fastclip.linalg.operator import unwrap
from fastclip.pipeline.methods.base import record_input_shapes
from fastclip.pipeline.models.layers import ConvBN
from fastclip.spectral import singular_values

logger = logging.getLogger(__name__)

__all__ = ["measure_layer_norms"]

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def measure_layer_norms(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
    progress: bool = True,
) -> list[dict]:
    """sigma_1 of every conv, linear and Conv+BN composition of ``model`` at its true input size.

    Input sizes come from one eval-mode forward pass at the per-sample ``input_shape``
    (:func:`fastclip.pipeline.methods.base.record_input_shapes`). Each layer is measured as the
    model computes it in eval mode: through its SpectralNorm wrapper if it has one,
    with its parametrisation (e.g. Miyato's spectral_norm) applied, BN with its
    running statistics. The value is :func:`fastclip.spectral.singular_values` with
    k = 1, which iterates to convergence (exact to about 1e-6 relative), in ``dtype``.
    A ConvBN whose ``bn`` is the identity (noBN) is the conv itself and is listed once.

    Returns one dict per layer, in definition order: ``layer`` (wrapper-free name),
    ``kind`` ("conv", "linear" or "conv+bn"), ``input_shape`` ("CxHxW"), ``sigma1``.

    Example::

        rows = measure_layer_norms(model, (3, 32, 32))
        # [{'layer': 'conv1', 'kind': 'conv+bn', 'input_shape': '3x32x32', 'sigma1': 4.2}, ...]
    """
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    shapes = record_input_shapes(model, tuple(input_shape))
    todo = []
    for name, mod in modules.items():
        if isinstance(mod, ConvBN):
            if isinstance(unwrap(mod.bn), nn.Identity):
                continue
            kind = "conv+bn"
        elif isinstance(mod, _LINEAR_TYPES):
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
        else:
            continue
        outer = outermost_name(name, modules)
        if outer not in shapes:
            logger.warning("layer %s is not used in the forward pass; skipped", name)
            continue
        todo.append((canonical_layer_name(name, modules), kind, outer))
    rows = []
    for layer, kind, outer in tqdm(todo, desc="layers", disable=not progress or None, leave=False):
        shape = shapes[outer]
        sigma = singular_values(modules[outer], shape, k=1, dtype=dtype, tol=tol)
        rows.append(
            {
                "layer": layer,
                "kind": kind,
                "input_shape": "x".join(map(str, shape)),
                "sigma1": float(sigma[0]),
            }
        )
        logger.info(
            "%s (%s, input %s): sigma_1 = %.6g", layer, kind, rows[-1]["input_shape"], rows[-1]["sigma1"]
        )
    return rows
