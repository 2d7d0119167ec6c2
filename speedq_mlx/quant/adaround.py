"""AdaRound (Nagel et al. 2020) as BRECQ uses it, for SPEED-Q stage 1: every weight rounds
down or up, decided by a learned variable V through a rectified sigmoid h(V) in [0, 1];
the hardened result is exact integer codes in MLX's affine format."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import format as F
from .layers import QuantLinear

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(v: mx.array) -> mx.array:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return mx.clip(mx.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def adaround_init(w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """V such that h(V) equals the fractional part of (w - b) / s (soft RTN start)."""
    g = F.grouped(w, group_size)
    s = scales[..., None]
    u = (g - biases[..., None]) / mx.where(s == 0, mx.ones_like(s), s)
    frac = u - mx.floor(u)
    p = mx.clip((frac - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA), 1e-4, 1 - 1e-4)
    return (mx.log(p) - mx.log1p(-p)).reshape(w.shape)


def adaround_codes(
    w: mx.array, v: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
    hard: bool = False,
) -> mx.array:
    """clip(floor((w - b) / s) + h(V), 0, n); hard=True rounds h(V) to {0, 1} (exact codes)."""
    g = F.grouped(w, group_size)
    s = scales[..., None]
    u = (g - biases[..., None]) / mx.where(s == 0, mx.ones_like(s), s)
    h = rectified_sigmoid(v).reshape(g.shape)
    if hard:
        h = (h >= 0.5).astype(w.dtype)
    return mx.clip(mx.floor(u) + h, 0, F.n_levels(bits)).reshape(w.shape)


def adaround_regularizer(v: mx.array, beta: float) -> mx.array:
    """sum(1 - |2 h(V) - 1|^beta): pushes every h(V) to 0 or 1 as beta anneals down."""
    return (1.0 - mx.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta).sum()


class AdaRoundLinear(nn.Module):
    """A linear whose weights are fixed and whose rounding (down / up) is learned (V).

    Scales and biases are fixed too (min/max or MSE-searched). `harden()` returns the
    frozen `QuantLinear` holding the exact integer codes the rounding chose.
    """

    def __init__(self, weight, bias, scales, biases, bits, group_size, scale_dtype=mx.float16):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self.scales = scales
        self.biases = biases
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.V = adaround_init(weight, scales, biases, group_size)
        self.hard = False

    def dequantized_weight(self) -> mx.array:
        q = adaround_codes(self.weight, self.V, self.scales, self.biases, self.bits,
                             self.group_size, hard=self.hard)
        return F.dequantize(q, self.scales, self.biases, self.group_size)

    def __call__(self, x):
        y = x @ self.dequantized_weight().astype(x.dtype).T
        return y + self.bias if "bias" in self else y

    def harden(self) -> QuantLinear:
        """Exact codes: latent weight s * q + b with the fixed (scales, biases)."""
        q = adaround_codes(self.weight, self.V, self.scales, self.biases, self.bits,
                             self.group_size, hard=True)
        w = F.dequantize(q, self.scales, self.biases, self.group_size)
        layer = QuantLinear(w, self.get("bias"), bits=self.bits, group_size=self.group_size,
                            scale_dtype=self.scale_dtype, scales=self.scales, biases=self.biases)
        layer.freeze()
        return layer
