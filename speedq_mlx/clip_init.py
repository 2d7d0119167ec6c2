"""SPEED-Q stage 3 step 1: asymmetric clipping initialisation of the language linears.

For every (output row, input group) of a linear, search a clip range
[beta * min, alpha * max] on a grid (alpha = 1 - i/20, beta = 1 - j/20, i, j < 10) that
minimises the layer's output error on calibration activations X,
    || X_g (Q(clip(W_rg)) - W_rg)^T ||^2 = d H_g d^T,  d = Q(clip(W_rg)) - W_rg,
where H_g = X_g^T X_g is the group's slice of the input Gram matrix (groups are
searched independently, as in the authors' code). Everything is vectorised over
rows and groups; only the 100 grid points are a Python loop.
"""

from __future__ import annotations

import mlx.core as mx

from . import quantizer as Q


def gram_blocks(x: mx.array, group_size: int) -> mx.array:
    """[n_groups, g, g] diagonal blocks of X^T X for inputs X [..., in]."""
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    n_groups = x.shape[-1] // group_size
    xg = x.reshape(x.shape[0], n_groups, group_size).transpose(1, 0, 2)  # [G, N, g]
    return xg.transpose(0, 2, 1) @ xg


def search_clip(
    w: mx.array, gram: mx.array, bits: int, group_size: int, scale_dtype=None, steps: int = 10,
    step: float = 0.05,
) -> tuple[mx.array, mx.array, dict]:
    """Best (scales, biases) per group over the alpha x beta grid, plus search stats.

    `gram` is `gram_blocks(X, group_size)`. The grid includes (1, 1), plain min/max,
    so the result is never worse than round-to-nearest on the calibration data.
    """
    out_dims, in_dims = w.shape
    w = w.astype(mx.float32)
    g = w.reshape(out_dims, in_dims // group_size, group_size)
    wmin, wmax = g.min(axis=-1), g.max(axis=-1)

    def err_for(s, b):
        d = (Q.dequantize(Q.codes(w, s, b, bits, group_size), s, b, group_size) - w)
        d = d.reshape(g.shape).transpose(1, 0, 2)  # [G, out, g]
        return ((d @ gram) * d).sum(axis=-1).T  # [out, G]

    s0, b0 = Q.params_from_range(wmin, wmax, bits, scale_dtype)
    best_err = err_for(s0, b0)
    rtn_err = best_err
    best_s, best_b = s0, b0
    mx.eval(best_err)
    for i in range(steps):
        for j in range(steps):
            if i == 0 and j == 0:
                continue
            s, b = Q.params_from_range(wmin * (1 - j * step), wmax * (1 - i * step), bits, scale_dtype)
            err = err_for(s, b)
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_s = mx.where(better, s, best_s)
            best_b = mx.where(better, b, best_b)
            mx.eval(best_err, best_s, best_b)
    stats = {"rtn_error": float(rtn_err.sum()), "clip_error": float(best_err.sum())}
    return best_s, best_b, stats


def clip_weight(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """Latent weights clipped into the chosen ranges (what QAT then starts from)."""
    g = w.reshape(w.shape[0], -1, group_size)
    lo = biases[..., None]
    hi = lo + scales[..., None] * Q.n_levels(bits)
    return mx.clip(g, lo, hi).reshape(w.shape).astype(w.dtype)
