"""speedq-mlx: SPEED-Q low-bit quantization of InternVL vision-language models in MLX."""

__version__ = "0.1.0"
