"""The quantizer module against MLX's own kernels and against independent numpy math."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from speedq_mlx.quant import format as Q
from speedq_mlx.quant.layers import QuantEmbedding, QuantLinear


@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
@pytest.mark.parametrize("group", Q.SUPPORTED_GROUP_SIZES)
def test_pack_unpack_bit_exact_against_mx_quantize(bits, group):
    w = mx.random.normal((48, 384), key=mx.random.key(bits * 1000 + group))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    q = Q.unpack(wq, bits)
    assert q.dtype == mx.uint32 and q.shape == w.shape
    assert int(q.max()) <= 2**bits - 1
    assert mx.array_equal(Q.pack(q, bits), wq)  # re-packing gives MLX's exact words
    ours = Q.dequantize(q.astype(mx.float32), s, b, group)
    ref = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=0, atol=1e-6)
    # and our own RTN packing is read back by mx.dequantize as our fake quantization
    p, s2, b2 = Q.quantize_rtn(w, bits, group)
    np.testing.assert_allclose(
        np.array(mx.dequantize(p, s2, b2, group_size=group, bits=bits)),
        np.array(Q.fake_quantize(w, s2, b2, bits, group)), rtol=0, atol=1e-6)


def _np_fake_quant(w, s, b, bits, group):
    """Independent float64 reference of s * clip(round((w - b) / s), 0, n) + b."""
    g = w.reshape(w.shape[0], -1, group)
    q = np.clip(np.round((g - b[..., None]) / s[..., None]), 0, 2**bits - 1)
    return (s[..., None] * q + b[..., None]).reshape(w.shape), q


def test_rtn_error_is_at_most_half_a_step():
    w = mx.random.normal((32, 256), key=mx.random.key(1))
    s, b = Q.minmax_params(w, 3, 64)
    err = mx.abs(Q.fake_quantize(w, s, b, 3, 64) - w).reshape(32, 4, 64)
    assert bool(mx.all(err <= s[..., None] / 2 + 1e-6))


def _clipping_setup(bits=2, group=32):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    g = w.reshape(8, -1, group)
    lo, hi = g.min(-1) * 0.6, g.max(-1) * 0.6  # a clipped range: some weights fall outside
    s = ((hi - lo) / (2**bits - 1)).astype(np.float32)
    b = lo.astype(np.float32)
    c = rng.standard_normal(w.shape).astype(np.float32)  # upstream gradient
    return w, s, b, c


def test_ste_gradient_is_masked_where_clipped():
    bits, group = 2, 32
    w, s, b, c = _clipping_setup(bits, group)
    loss = lambda w_: (Q.fake_quantize(w_, mx.array(s), mx.array(b), bits, group) * mx.array(c)).sum()
    grad = np.array(mx.grad(loss)(mx.array(w)))
    r = np.round((w.reshape(8, -1, group) - b[..., None]) / s[..., None]).reshape(w.shape)
    clipped = (r < 0) | (r > 2**bits - 1)
    assert 0 < clipped.sum() < clipped.size
    np.testing.assert_allclose(grad, np.where(clipped, 0.0, c), atol=0)
    # finite differences of the straight-through surrogate clip(w, b - s/2, b + (n + 1/2) s)
    s_full = np.repeat(s, group, axis=1)
    b_full = np.repeat(b, group, axis=1)
    surrogate = lambda x: (np.clip(x, b_full - s_full / 2, b_full + (2**bits - 0.5) * s_full) * c).sum()
    eps = 1e-4
    fd = np.zeros_like(w, dtype=np.float64)
    for idx in np.ndindex(*w.shape):
        d = np.zeros_like(w, dtype=np.float64)
        d[idx] = eps
        fd[idx] = (surrogate(w + d) - surrogate(w - d)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-3)


def test_scale_and_bias_gradients_match_finite_differences():
    bits, group = 2, 32
    w, s, b, c = _clipping_setup(bits, group)
    w64, s64, b64, c64 = (x.astype(np.float64) for x in (w, s, b, c))

    def f(s_, b_):
        return (_np_fake_quant(w64, s_, b_, bits, group)[0] * c64).sum()

    loss = lambda s_, b_: (Q.fake_quantize(mx.array(w), s_, b_, bits, group) * mx.array(c)).sum()
    gs, gb = mx.grad(loss, argnums=(0, 1))(mx.array(s), mx.array(b))
    eps = 1e-7
    for i in np.ndindex(*s.shape):
        d = np.zeros_like(s64)
        d[i] = eps
        fd_s = (f(s64 + d, b64) - f(s64 - d, b64)) / (2 * eps)
        fd_b = (f(s64, b64 + d) - f(s64, b64 - d)) / (2 * eps)
        assert abs(float(gs[i]) - fd_s) < 1e-3 * max(1, abs(fd_s)), (i, float(gs[i]), fd_s)
        assert abs(float(gb[i]) - fd_b) < 1e-3 * max(1, abs(fd_b)), (i, float(gb[i]), fd_b)


def test_learnable_qparams_train_through_quant_linear():
    lin = nn.Linear(128, 64)
    ql = QuantLinear.from_linear(lin, bits=2, group_size=64, learn_qparams=True, scale_dtype=None)
    x = mx.random.normal((4, 128), key=mx.random.key(3))
    target = lin(x)
    loss = lambda m: ((m(x) - target) ** 2).mean()
    grads = nn.value_and_grad(ql, loss)(ql)[1]
    assert set(grads) == {"weight", "bias", "scales", "biases"}
    assert float(mx.abs(grads["scales"]).sum()) > 0 and float(mx.abs(grads["biases"]).sum()) > 0


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (4, 32), (8, 128)])
@pytest.mark.parametrize("scale_dtype", [None, mx.float16])
def test_quant_linear_converts_to_mlx_quantized_linear(bits, group, scale_dtype):
    lin = nn.Linear(256, 96, bias=True)
    ql = QuantLinear.from_linear(lin, bits, group, scale_dtype=scale_dtype)
    qq = ql.to_quantized()
    assert isinstance(qq, nn.QuantizedLinear) and qq.bits == bits and qq.group_size == group
    x = mx.random.normal((5, 256), key=mx.random.key(7))
    ref, out = ql(x), qq(x).astype(mx.float32)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.array(lin(x)), np.array(ref), atol=1e-4)  # it really quantized


def test_quant_embedding_converts_and_serves_tied_head():
    emb = nn.Embedding(100, 64)
    qe = QuantEmbedding.from_embedding(emb, 4, 32, scale_dtype=None)
    qq = qe.to_quantized()
    ids = mx.array([[1, 5, 99]])
    np.testing.assert_allclose(np.array(qq(ids)), np.array(qe(ids)), atol=1e-6)
    h = mx.random.normal((2, 64), key=mx.random.key(2))
    np.testing.assert_allclose(np.array(qq.as_linear(h)), np.array(qe.as_linear(h)), atol=1e-4)


@pytest.mark.parametrize("bits,group,dims,msg", [
    (7, 64, 128, "bits=7"), (4, 16, 128, "group_size=16"), (4, 64, 96, "not divisible"),
])
def test_check_format_rejects_unrepresentable(bits, group, dims, msg):
    with pytest.raises(Q.QuantFormatError, match=msg):
        Q.check_format(bits, group, dims)


@pytest.mark.parametrize("learn_qparams", [False, True])
def test_pack_for_good_keeps_function_and_export_and_drops_the_latent(learn_qparams):
    """A frozen layer packed for good computes and exports exactly what it did, and no
    longer holds its float latent (the codes decide both, so nothing may train it again)."""
    from speedq_mlx.quant.layers import pack_frozen

    emb = QuantEmbedding.from_embedding(nn.Embedding(100, 64), 4, 32, learn_qparams=learn_qparams)
    lin = QuantLinear.from_linear(nn.Linear(64, 32), 2, 32, learn_qparams=learn_qparams)
    model = nn.Sequential(emb, lin)
    ids = mx.array([[1, 5, 99]])
    before_out, before_packed = model(ids), {i: m.packed() for i, m in enumerate(model.layers)}
    latent = emb.weight
    lin.freeze()
    emb.freeze()
    lin.unfreeze()  # trainable layers stay as they are
    assert pack_frozen(model) == 1 and emb.packed_for_good and not lin.packed_for_good
    assert emb.weight is not latent and not np.array_equal(np.array(emb.weight), np.array(latent))
    lin.freeze()
    assert pack_frozen(model) == 1 and pack_frozen(model) == 0
    np.testing.assert_array_equal(np.array(model(ids)), np.array(before_out))
    for i, m in enumerate(model.layers):
        for k, v in m.packed().items():
            np.testing.assert_array_equal(np.array(v), np.array(before_packed[i][k]))
    emb.unfreeze()
    with pytest.raises(RuntimeError, match="packed for good"):
        emb(ids)


def test_packed_layers_compute_from_their_codes_as_the_dense_copy_does(monkeypatch):
    """Packed for good with COMPUTE_FROM_CODES (a GPU's default), a layer keeps only its uint32
    codes, and its forward and its gradient with respect to the input match the dense-copy
    layer's (an independent dequantize + matmul), as its export does bit for bit."""
    from speedq_mlx.quant import layers as L

    def build():
        mx.random.seed(3)
        return (QuantEmbedding.from_embedding(nn.Embedding(96, 64), 4, 32, learn_qparams=True),
                QuantLinear.from_linear(nn.Linear(64, 48), 2, 32))

    outs = {}
    for from_codes in (False, True):
        monkeypatch.setattr(L, "COMPUTE_FROM_CODES", from_codes)
        emb, lin = build()
        for m in (emb, lin):
            m.freeze()
            m.pack_for_good()
        assert (emb.weight.dtype == mx.uint32) == from_codes and emb.weight_shape == (96, 64)
        ids = mx.array([[0, 7, 95, 7]])

        def loss(h):
            return (lin(h) ** 2).sum() + (emb.as_linear(h) * 0.1).sum()

        h = emb(ids)
        outs[from_codes] = (h, lin(h), emb.as_linear(h), mx.grad(loss)(h),
                            {(i, k): v for i, m in enumerate((emb, lin)) for k, v in m.packed().items()},
                            lin.to_quantized()(h))
    for a, b in zip(outs[False][:4], outs[True][:4]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(outs[False][0]), np.array(outs[True][0]))
    for k in outs[False][4]:
        np.testing.assert_array_equal(np.array(outs[False][4][k]), np.array(outs[True][4][k]))
    np.testing.assert_allclose(np.array(outs[True][5]), np.array(outs[True][1]), rtol=1e-4, atol=1e-4)
