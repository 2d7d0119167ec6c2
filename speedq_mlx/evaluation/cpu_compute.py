"""Quantized layers that compute fast on MLX's Linux CPU build.

There `mx.quantized_matmul` is ~50x slower than dequantizing the weight and running a float32
BLAS matmul once an input has more than a few rows (a 2048 x 576 input against a 2-bit
1536 x 576 weight: 2.1 s against 0.10 s); one-row inputs (decoding) are fast either way.
Evaluating an artifact on the CPU - perplexity and KL over text windows, a prompt's prefill -
is dominated by that kernel, so `use_fast_cpu_matmuls` makes the model's quantized layers
take the dequantize path for inputs of MIN_ROWS rows or more. The function is the same (to
float32 rounding: the same codes, scales and biases); memory is unchanged (the float
weight lives only during the call), and the decode path stays MLX's own kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

MIN_ROWS = 16


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


def dequantized(layer) -> mx.array:
    return mx.dequantize(layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def linear_call(layer, x: mx.array) -> mx.array:
    """nn.QuantizedLinear's output, through a float matmul for many-row inputs."""
    if layer.mode != "affine" or _rows(x) < MIN_ROWS:
        return nn.QuantizedLinear.__call__(layer, x)
    y = x @ dequantized(layer).astype(x.dtype).T
    return y + layer["bias"] if "bias" in layer else y


def embedding_as_linear(layer, x: mx.array) -> mx.array:
    """nn.QuantizedEmbedding.as_linear (a tied lm_head), likewise."""
    if layer.mode != "affine" or _rows(x) < MIN_ROWS:
        return nn.QuantizedEmbedding.as_linear(layer, x)
    return x @ dequantized(layer).astype(x.dtype).T


class FastCPUQuantizedLinear(nn.QuantizedLinear):
    __call__ = linear_call


class FastCPUQuantizedEmbedding(nn.QuantizedEmbedding):
    as_linear = embedding_as_linear


def use_fast_cpu_matmuls(model: nn.Module) -> int:
    """On the CPU, switch the model's quantized layers to the float-matmul path (in place, the
    same parameters); returns how many layers were switched (0 on a GPU)."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = FastCPUQuantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = FastCPUQuantizedEmbedding
            n += 1
    return n
