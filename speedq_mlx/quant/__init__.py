"""Quantization: MLX's affine format, fake-quantized layers, AdaRound, clipping, plans, recipes."""
