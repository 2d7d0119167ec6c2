"""Quantized layers on the CPU's float path compute what MLX's quantized kernel computes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from speedq_mlx.evaluation.cpu_compute import MIN_ROWS, use_fast_cpu_matmuls


@pytest.mark.parametrize("bits, group", [(2, 64), (4, 32), (3, 64), (8, 128)])
def test_float_path_equals_quantized_matmul(bits, group):
    key = mx.random.key(bits)
    lin = nn.Linear(256, 96, bias=True)
    lin.update({"weight": mx.random.normal((96, 256), key=key) * 0.05})
    emb = nn.Embedding(300, 256)
    model = nn.Sequential(lin, emb)
    nn.quantize(model, group_size=group, bits=bits)
    q_lin, q_emb = model.layers
    x = mx.random.normal((2, 40, 256), key=mx.random.key(9))
    ref_lin, ref_head = q_lin(x), q_emb.as_linear(x)
    assert use_fast_cpu_matmuls(model) == 2
    assert type(q_lin).__name__ == "FastCPUQuantizedLinear"
    np.testing.assert_allclose(np.array(q_lin(x)), np.array(ref_lin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(q_emb.as_linear(x)), np.array(ref_head), rtol=1e-4, atol=1e-5)
    one = x[:, :1]  # decoding keeps MLX's own kernel: exactly its result
    assert one.size // 256 < MIN_ROWS
    np.testing.assert_array_equal(np.array(q_lin(one)), np.array(nn.QuantizedLinear.__call__(q_lin, one)))
    assert {k for k, _ in model.parameters().items()} == {"layers"}  # same parameter tree
