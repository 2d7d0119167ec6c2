"""Error-compensating rounding (GPTQ, Frantar et al. 2022) onto MLX's affine grid, as a
start for stage 3's QAT (`[stage3] init = "gptq"`).

For one linear with calibration inputs X (H = X^T X), the columns are rounded in order and
each column's rounding error is spread over the columns not yet rounded through the
Cholesky factor of H^-1, which minimises ||X (W_q - W)^T||^2 far better than rounding every
weight to nearest. Each group's scale and bias are chosen when the group is reached, from
the already-compensated weights, by the same asymmetric clip search as `quant.clip`
(min/max for the layers the recipe's clip_skip names). The result is exact codes with their
scales and biases: the fake-quantized layer holds w = s * q + b, so QAT starts from them.

`gptq_init` runs the language model's decoder layer by layer on calibration batches: each
layer's inputs come from the layers already quantized before it (the quantized path), the
layer's Gram matrices are recorded with its float weights, its linears are rounded, and the
quantized layer then produces the next layer's inputs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import SpeedQError
from ..train import distributed as dist
from . import format as Q
from .layers import QuantLinear

# Qwen2 decoder linears that read the same input as another: one Gram matrix serves them.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}
DAMP = 0.01  # of the mean diagonal of H, added to it (GPTQ's default)


def _round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Values `dtype` can hold (the dtype scales are stored in), as float64."""
    if dtype is None:
        return x.astype(np.float64)
    return np.array(mx.array(x.astype(np.float32)).astype(dtype).astype(mx.float32), dtype=np.float64)


def _group_params(w: np.ndarray, gram: np.ndarray, bits: int, search: bool, scale_dtype,
                  steps: int = 10, step: float = 0.05):
    """(scales, biases) [out] of one group of columns w [out, g]: MLX's round-to-nearest grid,
    or with `search` the best of it and the asymmetric clips [(1 - j/20) min, (1 - i/20) max],
    i, j < 10, by each row's output error d H d^T on the group's inputs (quant.clip's search,
    vectorised here over the grid; the RTN grid comes first and wins ties)."""
    top = Q.n_levels(bits)
    s0, b0 = (np.array(x[:, 0], dtype=np.float64)
              for x in Q.rtn_params(mx.array(w.astype(np.float32)), bits, w.shape[1], scale_dtype))
    if not search:
        return s0, b0
    wmin, wmax = w.min(axis=1), w.max(axis=1)
    shrink = [(i, j) for i in range(steps) for j in range(steps)]
    hi = np.stack([wmax * (1 - i * step) for i, _ in shrink])  # [K, out]
    lo = np.stack([wmin * (1 - j * step) for _, j in shrink])
    s = np.concatenate([s0[None], _round_to((hi - lo) / top, scale_dtype)])
    b = np.concatenate([b0[None], _round_to(lo, scale_dtype)])
    safe = np.where(s == 0, 1.0, s)[..., None]
    q = np.clip(np.round((w[None] - b[..., None]) / safe), 0, top)
    d = s[..., None] * q + b[..., None] - w[None]  # [K, out, g]
    err = ((d @ gram) * d).sum(axis=-1)  # [K, out] (a BLAS matmul; einsum would loop)
    best = np.argmin(err, axis=0)
    rows = np.arange(w.shape[0])
    return s[best, rows], b[best, rows]


def inverse_cholesky(H: np.ndarray, retries: int = 4) -> np.ndarray:
    """Upper U with (H + damp I)^-1 = U^T U, damp = DAMP x mean diagonal.

    H is symmetrised first and inverted through its own Cholesky factor: MLX's float32
    x^T x is not exactly symmetric, and a plain inverse amplifies that by 1 / lambda_min^2,
    enough on Qwen2.5-0.5B's outlier channels for the inverse to have no Cholesky factor.
    If one still fails, the damping is raised tenfold (a fallback)."""
    if not np.isfinite(H).all():
        raise FloatingPointError("the calibration inputs' Gram matrix is not finite")
    H = (H + H.T) / 2
    eye = np.eye(H.shape[0])

    def factor(damp: float) -> np.ndarray:
        lower_inv = np.linalg.inv(np.linalg.cholesky(H + damp * eye))  # H = L L^T
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T

    damp = DAMP * np.mean(np.diag(H))
    for _ in range(retries):
        try:
            return factor(damp)
        except np.linalg.LinAlgError:
            damp *= 10
    return factor(damp)  # the last try's error is the caller's


def gptq_quantize(w, gram, bits: int, group_size: int, search: bool = True, scale_dtype=None,
                  block: int = 128):
    """Codes [out, in] and (scales, biases) [out, in / group] of weight w [out, in] given the
    Gram matrix of its inputs `gram` [in, in] (sums of x^T x)."""
    W = np.array(w, dtype=np.float64)
    H = np.array(gram, dtype=np.float64)
    out_dims, in_dims = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H0 = H.copy()  # the group searches see the undamped inputs
    U = inverse_cholesky(H)
    top = Q.n_levels(bits)
    n_groups = in_dims // group_size
    scales, biases = np.zeros((out_dims, n_groups)), np.zeros((out_dims, n_groups))
    codes = np.zeros((out_dims, in_dims))
    for i1 in range(0, in_dims, block):
        i2 = min(i1 + block, in_dims)
        W1, err = W[:, i1:i2].copy(), np.zeros((out_dims, i2 - i1))
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                g, sl = col // group_size, slice(col, col + group_size)
                cur = np.concatenate([W1[:, j:], W[:, i2:]], axis=1)[:, :group_size]
                scales[:, g], biases[:, g] = _group_params(cur, H0[sl, sl], bits, search, scale_dtype)
            s, b = scales[:, col // group_size], biases[:, col // group_size]
            safe = np.where(s == 0, 1.0, s)
            q = np.clip(np.round((W1[:, j] - b) / safe), 0, top)
            codes[:, col] = q
            e = (W1[:, j] - (s * q + b)) / U[col, col]
            W1[:, j:] -= np.outer(e, U[col, col:i2])
            err[:, j] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return codes, scales, biases


def _masked_gram(x: mx.array, mask) -> mx.array:
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    if mask is not None:
        x = x * mask.reshape(-1, 1).astype(mx.float32)
    return x.T @ x


class _Recorder(nn.Module):
    """A float linear that adds its inputs' Gram matrix up while it computes."""

    def __init__(self, inner: nn.Module, record: bool):
        super().__init__()
        self.inner, self.record, self.gram, self.mask = inner, record, None, None

    def __call__(self, x):
        if self.record:
            g = _masked_gram(x, self.mask)
            self.gram = g if self.gram is None else self.gram + g
            mx.eval(self.gram)
        return self.inner(x)


def _float_twin(layer: QuantLinear, dtype) -> nn.Linear:
    out_dims, in_dims = layer.weight.shape
    twin = nn.Linear(in_dims, out_dims, bias="bias" in layer)
    twin.weight = layer.weight.astype(dtype)
    if "bias" in layer:
        twin.bias = layer.bias
    return twin


def _set(block, dotted: str, module) -> None:
    parent, leaf = dotted.split(".")
    setattr(getattr(block, parent), leaf, module)


def _get(block, dotted: str):
    parent, leaf = dotted.split(".")
    return getattr(getattr(block, parent), leaf)


def _layer_grams(layer, linears: list[str], inputs: list, masks: list, dtype) -> dict:
    """Gram matrix per linear of one decoder layer, from its float weights on `inputs`."""
    quantized = {n: _get(layer, n) for n in linears}
    recorders = {n: _Recorder(_float_twin(quantized[n], dtype), n not in SHARED_INPUT) for n in linears}
    for n, r in recorders.items():
        _set(layer, n, r)
    try:
        for h, m in zip(inputs, masks):
            for r in recorders.values():
                r.mask = m
            mx.eval(layer(h, "causal", None))
    finally:
        for n in linears:
            _set(layer, n, quantized[n])
    return {n: recorders[SHARED_INPUT.get(n, n)].gram for n in linears}


def gptq_init(model, layers: dict, skip: list, batches: list, image_token: int, compute_dtype,
              scale_dtype, log=print) -> dict:
    """GPTQ-round the language model's fake-quantized linears among `layers` (path ->
    (bits, group)), decoder layer by decoder layer on calibration `batches`; the clip
    search picks each group's range except for names in `skip`. Returns per-path stats."""
    from tqdm import tqdm

    from ..model.forward import input_embeddings

    prefix = "language_model.model.layers"
    decoder = model.language_model.model.layers
    inputs = [input_embeddings(model, b["input_ids"], b["pixel_values"], image_token) for b in batches]
    masks = [b.get("attention_mask") for b in batches]
    mx.eval(inputs)
    stats = {}
    for i in tqdm(range(len(decoder)), desc="gptq init", unit="layer", disable=not dist.is_main()):
        layer = decoder[i]
        linears = [n for n in (*SHARED_INPUT.values(), *SHARED_INPUT, "self_attn.o_proj", "mlp.down_proj")
                   if f"{prefix}.{i}.{n}" in layers]
        linears = sorted(set(linears))
        grams = _layer_grams(layer, linears, inputs, masks, compute_dtype)
        for n in linears:
            path = f"{prefix}.{i}.{n}"
            bits, group = layers[path]
            try:
                stats[path] = _round_linear(_get(layer, n), np.array(grams[n]), bits, group,
                                            n.rsplit(".", 1)[-1] not in skip, scale_dtype)
            except (FloatingPointError, np.linalg.LinAlgError) as e:
                raise SpeedQError(f"gptq init failed at {path}: {e} (set [stage3] init = \"clip\" "
                                  "in the recipe to start from the clip search instead)") from None
        inputs = [layer(h, "causal", None) for h in inputs]  # the quantized layer feeds the next
        mx.eval(inputs)
    if stats:
        before = sum(v["rtn_error"] for v in stats.values())
        after = sum(v["gptq_error"] for v in stats.values())
        log(f"gptq init: {len(stats)} layers, calibration output error {before:.4g} (min/max, "
            f"nearest) -> {after:.4g}")
    return stats


def _output_error(w: np.ndarray, wq: np.ndarray, gram: np.ndarray) -> float:
    d = wq - w
    return float(((d @ gram) * d).sum())


def _round_linear(layer: QuantLinear, gram: np.ndarray, bits: int, group: int, search: bool,
                  scale_dtype) -> dict:
    """Replace a QuantLinear's latent weight by GPTQ's exact codes, its scales by theirs."""
    w = np.array(layer.weight.astype(mx.float32), dtype=np.float64)
    codes, s, b = gptq_quantize(w, gram, bits, group, search, scale_dtype)
    wq = (codes.reshape(codes.shape[0], -1, group) * s[..., None] + b[..., None]).reshape(codes.shape)
    s0, b0 = Q.rtn_params(mx.array(w.astype(np.float32)), bits, group, scale_dtype)
    rtn = np.array(Q.dequantize(Q.codes(mx.array(w.astype(np.float32)), s0, b0, bits, group), s0, b0, group))
    dtype = layer.weight.dtype
    layer.weight = mx.array(wq.astype(np.float32)).astype(dtype)
    layer.scales = mx.array(s.astype(np.float32)).astype(dtype)
    layer.biases = mx.array(b.astype(np.float32)).astype(dtype)
    return {"rtn_error": _output_error(w, rtn, gram), "gptq_error": _output_error(w, wq, gram)}
