"""MLX's affine weight quantization, as one set of functions that every stage shares.

The format is exactly the one `mx.quantize` / `mx.dequantize` / `nn.QuantizedLinear`
use: for each row and each group of `group_size` consecutive inputs there is one
scale `s` and one bias `b`, the integer codes are q in [0, 2**bits - 1] and the
weight is w = s * q + b. Codes are packed LSB-first into uint32 words. Because
training, export and evaluation all go through these functions, an exported
model computes the same function as the fake-quantized one that was trained.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


class QuantFormatError(ValueError):
    """A bits / group size / shape combination that MLX's affine format cannot hold."""


def check_format(bits: int, group_size: int, in_dims: int | None = None, name: str = "") -> None:
    """Raise QuantFormatError with a one-line reason when the format is not representable."""
    where = f" for {name}" if name else ""
    if bits not in SUPPORTED_BITS:
        raise QuantFormatError(
            f"bits={bits}{where} is not supported by MLX affine quantization "
            f"(choose one of {', '.join(map(str, SUPPORTED_BITS))})"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantFormatError(
            f"group_size={group_size}{where} is not supported by MLX affine quantization "
            f"(choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
        )
    if in_dims is not None and in_dims % group_size != 0:
        raise QuantFormatError(
            f"input dimension {in_dims}{where} is not divisible by group_size={group_size}"
        )


def is_representable(bits: int, group_size: int, in_dims: int) -> bool:
    """check_format as a predicate, for callers that choose among settings."""
    try:
        check_format(bits, group_size, in_dims)
    except QuantFormatError:
        return False
    return True


def n_levels(bits: int) -> int:
    """Largest code, 2**bits - 1."""
    return (1 << bits) - 1


def grouped(w: mx.array, group_size: int) -> mx.array:
    out_dims, in_dims = w.shape
    return w.reshape(out_dims, in_dims // group_size, group_size)


def round_to_dtype(x: mx.array, dtype) -> mx.array:
    """Round x to the values `dtype` can hold (the dtype scales are stored in), keeping x's dtype.

    Straight-through: the gradient passes unchanged.
    """
    if dtype is None or dtype == x.dtype:
        return x
    return x + mx.stop_gradient(x.astype(dtype).astype(x.dtype) - x)


def params_from_range(
    wmin: mx.array, wmax: mx.array, bits: int, scale_dtype=None
) -> tuple[mx.array, mx.array]:
    """Scale and bias that map [wmin, wmax] (per group) onto codes [0, 2**bits - 1]."""
    scales = (wmax - wmin) / n_levels(bits)
    biases = wmin
    return round_to_dtype(scales, scale_dtype), round_to_dtype(biases, scale_dtype)


def minmax_params(
    w: mx.array, bits: int, group_size: int, scale_dtype=None
) -> tuple[mx.array, mx.array]:
    """Round-to-nearest parameters: each group's min and max are the ends of the grid.

    Returns (scales, biases), each [out, in / group_size].
    """
    g = grouped(w, group_size)
    return params_from_range(g.min(axis=-1), g.max(axis=-1), bits, scale_dtype)


def mlx_params(
    w: mx.array, bits: int, group_size: int, scale_dtype=None
) -> tuple[mx.array, mx.array]:
    """The parameters `mx.quantize` computes: the grid spans the group's larger-magnitude
    edge (its bias) in whole steps through 0, so 0 is a code and the other edge may be
    clipped by up to a step. Scales are negative when that edge is the maximum."""
    g = grouped(w, group_size)
    wmin, wmax = g.min(axis=-1), g.max(axis=-1)
    scale = mx.maximum((wmax - wmin) / n_levels(bits), 1e-7)
    side = mx.abs(wmin) > mx.abs(wmax)
    scale = mx.where(side, scale, -scale)
    edge = mx.where(side, wmin, wmax)
    q0 = mx.round(edge / scale)
    scale = mx.where(q0 != 0, edge / q0, scale)
    bias = mx.where(q0 == 0, mx.zeros_like(edge), edge)
    return round_to_dtype(scale, scale_dtype), round_to_dtype(bias, scale_dtype)


def rtn_params(
    w: mx.array, bits: int, group_size: int, scale_dtype=None
) -> tuple[mx.array, mx.array]:
    """Round-to-nearest parameters: per group, MLX's zero-exact grid (`mlx_params`) or plain
    min/max, whichever reconstructs the group's weights better. Data-free either way; at 2
    bits the zero-exact grid keeps near-zero weights - most of them - at 0 instead of +-s/2
    (held-out KL of SmolLM2-135M at W2: 7.5 against 10.6 for min/max), while weights that
    already sit on a min/max grid (a Q4_1 GGUF's) re-quantize losslessly with min/max."""
    scales, biases, _ = rtn_fit(w, bits, group_size, scale_dtype)
    return scales, biases


def rtn_fit(
    w: mx.array, bits: int, group_size: int, scale_dtype=None
) -> tuple[mx.array, mx.array, mx.array]:
    """(scales, biases, dequantized weight) of `rtn_params`: the grid and Q(w) it gives,
    the latter from the reconstruction already made to choose the grid (lazy: free when
    unused; what quant.sensitivity prices every candidate setting with)."""
    candidates = [mlx_params(w, bits, group_size, scale_dtype),
                  minmax_params(w, bits, group_size, scale_dtype)]
    deq = [grouped(dequantize(codes(w, s, b, bits, group_size), s, b, group_size), group_size)
           for s, b in candidates]
    g = grouped(w, group_size)
    errs = [((d - g) ** 2).sum(axis=-1) for d in deq]
    use_mlx = errs[0] <= errs[1]
    (s0, b0), (s1, b1) = candidates
    q = mx.where(use_mlx[..., None], deq[0], deq[1]).reshape(w.shape)
    return mx.where(use_mlx, s0, s1), mx.where(use_mlx, b0, b1), q


def codes(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Integer codes round((w - b) / s) clipped to [0, 2**bits - 1], in w's float dtype.

    A group whose scale is 0 (all weights equal) gets code 0, i.e. w = b.
    """
    g = grouped(w, group_size)
    s = scales[..., None]
    safe = mx.where(s == 0, mx.ones_like(s), s)
    q = mx.clip(mx.round((g - biases[..., None]) / safe), 0, n_levels(bits))
    return q.reshape(w.shape)


def dequantize(
    q: mx.array, scales: mx.array, biases: mx.array, group_size: int
) -> mx.array:
    """w = s * q + b with the per-group parameters broadcast over their group."""
    g = grouped(q, group_size)
    return (scales[..., None] * g + biases[..., None]).reshape(q.shape)


def fake_quantize(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Quantize-dequantize w, differentiably.

    Forward: exactly s * q + b with q = codes(w, s, b).
    Backward: straight-through estimator for w (the gradient passes where the clip
    did not move the rounded code, zero elsewhere); for s and b the exact gradient
    of s * q + b with the codes held fixed (q and 1), as `mx.quantized_matmul` gives.
    A custom VJP recomputes the codes in the backward pass instead of keeping the
    forward's temporaries: QAT of a 0.5B model would otherwise hold several copies
    of every weight matrix until the backward pass.
    """
    g = grouped(w, group_size)
    out = _fake_quant_fn(bits)(g, scales[..., None], biases[..., None])
    return out.reshape(w.shape)


_FAKE_QUANT_FNS: dict = {}


def _fake_quant_fn(bits: int):
    """The custom-VJP fake quantizer for one bit width (grouped w [out, G, g], s/b [out, G, 1])."""
    if bits in _FAKE_QUANT_FNS:
        return _FAKE_QUANT_FNS[bits]
    top = n_levels(bits)

    def rounded(g, s, b):
        safe = mx.where(s == 0, mx.ones_like(s), s)
        r = mx.round((g - b) / safe)
        return r, mx.clip(r, 0, top)

    @mx.custom_function
    def fq(g, s, b):
        return s * rounded(g, s, b)[1] + b

    @fq.vjp
    def fq_vjp(primals, cotangent, output):
        g, s, b = primals
        r, q = rounded(g, s, b)
        dg = mx.where(r == q, cotangent, mx.zeros_like(cotangent))
        ds = (cotangent * q).sum(axis=-1, keepdims=True)
        db = cotangent.sum(axis=-1, keepdims=True)
        return dg, ds, db

    _FAKE_QUANT_FNS[bits] = fq
    return fq


def pack(q, bits: int) -> mx.array:
    """Pack integer codes [out, in] into MLX's uint32 layout [out, in * bits / 32].

    The codes form one LSB-first bit stream per row, read as little-endian uint32
    words; this is the layout `mx.quantize` writes for every supported bit width.
    """
    q = np.asarray(q).astype(np.uint32)
    if q.ndim != 2 or (q.shape[1] * bits) % 32 != 0:
        raise QuantFormatError(f"cannot pack codes of shape {q.shape} at {bits} bits")
    if 32 % bits == 0:  # whole codes per word: shift and add
        per_word = 32 // bits
        shifts = (np.arange(per_word, dtype=np.uint32) * bits)
        words = (q.reshape(q.shape[0], -1, per_word) << shifts).sum(axis=-1, dtype=np.uint32)
        return mx.array(words)
    rows = []
    shifts = np.arange(bits, dtype=np.uint32)
    step = max(1, (1 << 24) // max(1, q.shape[1] * bits))  # bound the temporary bit array
    for start in range(0, q.shape[0], step):
        chunk = q[start : start + step]
        stream = ((chunk[..., None] >> shifts) & 1).astype(np.uint8).reshape(chunk.shape[0], -1)
        rows.append(np.packbits(stream, axis=-1, bitorder="little").view("<u4"))
    return mx.array(np.concatenate(rows, axis=0))


def unpack(packed, bits: int) -> mx.array:
    """Inverse of `pack`: uint32 words [out, in * bits / 32] -> codes [out, in] (uint32)."""
    p = np.ascontiguousarray(np.asarray(packed).astype("<u4"))
    out_dims = p.shape[0]
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        q = (p[..., None] >> shifts) & np.uint32(n_levels(bits))
        return mx.array(q.reshape(out_dims, -1))
    stream = np.unpackbits(p.view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(out_dims, -1, bits).astype(np.uint32)
    q = (stream << np.arange(bits, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return mx.array(q)


def quantize_rtn(
    w: mx.array, bits: int, group_size: int, scale_dtype=None
) -> tuple[mx.array, mx.array, mx.array]:
    """Round-to-nearest: (packed uint32 weight, scales, biases) readable by mx.dequantize."""
    check_format(bits, group_size, w.shape[-1])
    scales, biases = rtn_params(w, bits, group_size, scale_dtype)
    q = codes(w, scales, biases, bits, group_size)
    return pack(q, bits), scales, biases


def mse_params(
    w: mx.array, bits: int, group_size: int, scale_dtype=None, grid: int = 20,
    min_shrink: float = 0.5,
) -> tuple[mx.array, mx.array]:
    """Per-group range [a*min, a*max] with the shrink a in [min_shrink, 1] that minimises
    the weight reconstruction error ||w - Q(w)||^2 (round-to-nearest on that grid)."""
    g = grouped(w, group_size)
    wmin, wmax = g.min(axis=-1), g.max(axis=-1)
    best_err = best_s = best_b = None
    for i in range(grid):
        a = 1.0 - (1.0 - min_shrink) * i / max(1, grid - 1)
        s, b = params_from_range(wmin * a, wmax * a, bits, scale_dtype)
        err = ((dequantize(codes(w, s, b, bits, group_size), s, b, group_size) - w) ** 2)
        err = err.reshape(g.shape).sum(axis=-1)
        if best_err is None:
            best_err, best_s, best_b = err, s, b
        else:
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_s = mx.where(better, s, best_s)
            best_b = mx.where(better, b, best_b)
        mx.eval(best_err, best_s, best_b)
    return best_s, best_b
