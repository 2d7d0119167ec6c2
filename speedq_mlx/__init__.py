"""speedq-mlx: SPEED-Q low-bit quantization of InternVL vision-language models in MLX."""

from .blas import use_fast_blas

use_fast_blas()  # before anything imports mlx.core (Linux: OpenBLAS instead of the reference BLAS)

__version__ = "0.1.0"
