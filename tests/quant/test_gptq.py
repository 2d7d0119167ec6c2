"""GPTQ-style rounding onto MLX's affine grid (quant/gptq.py): the blocked implementation
against a column-by-column reference written from the paper, and its error against
round-to-nearest on correlated inputs."""

import mlx.core as mx
import numpy as np
import pytest

from speedq_mlx.quant import format as Q
from speedq_mlx.quant.gptq import DAMP, gptq_quantize


def _problem(seed=0, out=24, inp=256, n=512):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((inp, inp)) * 0.3 + np.eye(inp)  # correlated inputs, as real activations
    x = rng.standard_normal((n, inp)) @ mix
    w = rng.standard_normal((out, inp)) * 0.05
    return w, x, x.T @ x


def _reference(w, gram, bits, group):
    """GPTQ one column at a time (no lazy blocks), each group's round-to-nearest parameters
    (format.rtn_params) taken from the compensated weights when the group starts."""
    W = w.astype(np.float64).copy()
    H = gram.astype(np.float64).copy()
    H[np.diag_indices(len(H))] += DAMP * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    top = 2**bits - 1
    codes, s, b = np.zeros_like(W), None, None
    for i in range(W.shape[1]):
        if i % group == 0:
            s, b = (np.array(x[:, 0]).astype(np.float64)
                    for x in Q.rtn_params(mx.array(W[:, i:i + group].astype(np.float32)), bits, group))
        q = np.clip(np.round((W[:, i] - b) / s), 0, top)
        codes[:, i] = q
        e = (W[:, i] - (s * q + b)) / U[i, i]
        W[:, i:] -= np.outer(e, U[i, i:])
    return codes


@pytest.mark.parametrize("bits", [2, 4])
def test_blocked_gptq_equals_the_column_by_column_reference(bits):
    w, _, gram = _problem()
    codes, _, _ = gptq_quantize(w, gram, bits, 64, search=False, block=128)
    ref = _reference(w, gram, bits, 64)
    assert np.mean(codes == ref) > 0.999  # float-order ties aside, the same codes


def _error(w, codes, s, b, gram, group):
    wq = (codes.reshape(len(w), -1, group) * s[..., None] + b[..., None]).reshape(w.shape)
    d = wq - w
    return float(np.einsum("oi,ij,oj->", d, gram, d))


def test_gptq_beats_round_to_nearest_and_lies_on_the_grid():
    w, x, gram = _problem(seed=1)
    codes, s, b = gptq_quantize(w, gram, 2, 64, search=True)
    assert codes.min() >= 0 and codes.max() <= 3 and np.all(codes == np.round(codes))
    s0, b0 = Q.rtn_params(mx.array(w.astype(np.float32)), 2, 64)
    rtn = np.array(Q.codes(mx.array(w.astype(np.float32)), s0, b0, 2, 64))
    e_rtn = _error(w, rtn, np.array(s0), np.array(b0), gram, 64)
    e_gptq = _error(w, codes, s, b, gram, 64)
    print(f"W2 g64 output error: RTN {e_rtn:.4g}, GPTQ {e_gptq:.4g}")
    assert e_gptq < 0.5 * e_rtn
    # exported as MLX stores it, the same function: mx.dequantize of the packed codes
    packed = Q.pack(mx.array(codes.astype(np.uint32)), 2)
    back = mx.dequantize(packed, mx.array(s.astype(np.float32)), mx.array(b.astype(np.float32)), 64, 2)
    wq = (codes.reshape(len(w), -1, 64) * s[..., None] + b[..., None]).reshape(w.shape)
    np.testing.assert_allclose(np.array(back), wq, atol=1e-6)


def test_dead_inputs_are_ignored():
    w, x, gram = _problem(seed=2)
    gram[:, 5] = gram[5, :] = 0  # an input that never fires
    codes, s, b = gptq_quantize(w, gram, 4, 64, search=False)
    assert np.isfinite(codes).all() and np.isfinite(s).all()


def test_group_search_is_the_clip_search():
    """The vectorised per-group range search picks what quant.clip.search_clip picks."""
    from speedq_mlx.quant.clip import search_clip
    from speedq_mlx.quant.gptq import _group_params

    w, x, gram = _problem(seed=3, out=32, inp=64)
    for bits in (2, 3, 4):
        s, b = _group_params(w, gram, bits, True, mx.float16)
        s2, b2, _ = search_clip(mx.array(w.astype(np.float32)), mx.array(gram[None].astype(np.float32)), bits, 64, mx.float16)
        np.testing.assert_array_equal(s, np.array(s2)[:, 0])
        np.testing.assert_array_equal(b, np.array(b2)[:, 0])


def test_inverse_cholesky_factors_the_damped_inverse_and_raises_the_damping_only_when_needed():
    from speedq_mlx.quant.gptq import inverse_cholesky

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32))
    H = x.T @ x
    U = inverse_cholesky(H)
    damped = H + DAMP * np.mean(np.diag(H)) * np.eye(32)
    assert np.allclose(np.triu(U), U) and np.allclose(U.T @ U, np.linalg.inv(damped), rtol=1e-8, atol=1e-12)
    # indefinite beyond GPTQ's default damping (as float32 rounding leaves outlier Gram matrices):
    # one eigenvalue at -5% of the mean diagonal; the factor is of the tenfold damping's inverse
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    eig = np.full(32, 1.0)
    eig[0] = -0.05 * np.mean(np.diag(q @ np.diag(np.abs(eig)) @ q.T))
    bad = q @ np.diag(eig) @ q.T
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(bad + DAMP * np.mean(np.diag(bad)) * np.eye(32))
    U = inverse_cholesky(bad)
    assert np.allclose(U.T @ U, np.linalg.inv(bad + 10 * DAMP * np.mean(np.diag(bad)) * np.eye(32)), rtol=1e-8)
    with pytest.raises(FloatingPointError):
        inverse_cholesky(np.full((4, 4), np.nan))


def test_inverse_cholesky_survives_the_asymmetry_of_a_float32_gram_matrix():
    """MLX's float32 x^T x is not exactly symmetric; inverting it as it is amplifies that
    by 1 / lambda_min^2 and the Cholesky factor (one triangle) of the inverse can fail - as it
    did on Qwen2.5-0.5B's layer-0 q/k/v inputs. The factor is of the symmetrised matrix."""
    from speedq_mlx.quant.gptq import inverse_cholesky

    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    H = q @ np.diag(np.logspace(0, 5, 64)) @ q.T
    A = H + np.triu(rng.normal(size=(64, 64)), 1)
    damped = (A + A.T) / 2 + DAMP * np.mean(np.diag(A)) * np.eye(64)
    with pytest.raises(np.linalg.LinAlgError):  # the old way: inv, then Cholesky
        np.linalg.cholesky(np.linalg.inv(A + DAMP * np.mean(np.diag(A)) * np.eye(64)))
    U = inverse_cholesky(A)
    assert np.allclose(U.T @ U, np.linalg.inv(damped), rtol=1e-7, atol=1e-12)
