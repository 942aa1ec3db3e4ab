"""FastClip: exact spectrum extraction and clipping for implicitly linear layers."""
from fastclip.spectral import singular_values, power_qr, power_iteration, lanczos, SpectralResult
from fastclip.operator import AffineOperator
from fastclip.exact import explicit_matrix, exact_singular_values, svds_singular_values, fft_singular_values

__version__ = "0.1.0"
__all__ = ["singular_values", "power_qr", "power_iteration", "lanczos", "SpectralResult", "AffineOperator",
           "explicit_matrix", "exact_singular_values", "svds_singular_values", "fft_singular_values"]
