"""FastClip: exact spectrum extraction and clipping for implicitly linear layers.

Example::

    import torch.nn as nn, fastclip
    conv = nn.Conv2d(3, 64, 3, padding=1)
    fastclip.singular_values(conv, (3, 32, 32), k=3)       # top-3, converged
    fastclip.clip_spectral_norm_(conv, (3, 32, 32), 1.0)    # (sigma_1 before, after)
    layer = fastclip.SpectralNorm(conv, clip=1.0)           # track + clip while training
    sn = fastclip.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3), input_shape=(3, 32, 32))
    clipper = fastclip.Clipper(model, (3, 32, 32), clip=1.0)  # any model; clipper.step() per step
"""

from fastclip import parametrizations
from fastclip.clipper import Clipper
from fastclip.clipping import clip_spectral_norm_
from fastclip.exact import exact_singular_values, explicit_matrix, fft_singular_values, svds_singular_values
from fastclip.linalg.operator import AffineOperator, unwrap
from fastclip.lipschitz import LipschitzReport, lipschitz_report
from fastclip.spectral import SpectralResult, lanczos, power_iteration, power_qr, singular_values
from fastclip.wrapper import SpectralNorm, SpectralNormConfig

__version__ = "0.1.0"
__all__ = [
    "singular_values",
    "power_qr",
    "power_iteration",
    "lanczos",
    "SpectralResult",
    "AffineOperator",
    "explicit_matrix",
    "exact_singular_values",
    "svds_singular_values",
    "fft_singular_values",
    "clip_spectral_norm_",
    "SpectralNorm",
    "SpectralNormConfig",
    "Clipper",
    "unwrap",
    "lipschitz_report",
    "LipschitzReport",
    "parametrizations",
    "__version__",
]
