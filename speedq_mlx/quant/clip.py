"""SPEED-Q stage 3 step 1: asymmetric clipping initialisation of the language linears.

`clip_init` records the input Gram blocks of every target linear on calibration batches
(the float model's activations), searches each linear's clip, and moves the latent weights
(and, when they are learned, the scales and biases) of the fake-quantized layers there.

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
import mlx.nn as nn

from ..model.forward import logits as vlm_logits
from ..train import distributed as dist
from . import format as Q
from .layers import QuantLinear


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
    """Best (scales, biases) per group over MLX's round-to-nearest grid and the alpha x beta
    grid, plus search stats.

    `gram` is `gram_blocks(X, group_size)`. The RTN grid is the first candidate, so the result
    is never worse than round-to-nearest on the calibration data.
    """
    out_dims, in_dims = w.shape
    w = w.astype(mx.float32)
    g = w.reshape(out_dims, in_dims // group_size, group_size)
    wmin, wmax = g.min(axis=-1), g.max(axis=-1)

    def err_for(s, b):
        d = (Q.dequantize(Q.codes(w, s, b, bits, group_size), s, b, group_size) - w)
        d = d.reshape(g.shape).transpose(1, 0, 2)  # [G, out, g]
        return ((d @ gram) * d).sum(axis=-1).T  # [out, G]

    s0, b0 = Q.rtn_params(w, bits, group_size, scale_dtype)
    best_err = err_for(s0, b0)
    rtn_err = best_err
    best_s, best_b = s0, b0
    mx.eval(best_err)
    for i in range(steps):
        for j in range(steps):
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
    """Latent weights clipped into the chosen ranges (what QAT then starts from); a negative
    scale (an RTN grid spanning down from its maximum) is the same range reversed."""
    g = w.reshape(w.shape[0], -1, group_size)
    ends = biases[..., None], biases[..., None] + scales[..., None] * Q.n_levels(bits)
    return mx.clip(g, mx.minimum(*ends), mx.maximum(*ends)).reshape(w.shape).astype(w.dtype)


# ---------------------------------------------------------------- calibration and apply


class _GramRecorder(nn.Module):
    """Stands in for a linear during calibration and accumulates X^T X group blocks."""

    def __init__(self, inner, group_size):
        super().__init__()
        self.inner = inner
        self.group_size = group_size
        self.gram = None

    def __call__(self, x):
        g = gram_blocks(x, self.group_size)
        self.gram = g if self.gram is None else self.gram + g
        mx.eval(self.gram)
        return self.inner(x)


def _float_twin(layer: QuantLinear, dtype) -> nn.Linear:
    """The float linear a fake-quantized layer started from (its latent weight, in dtype)."""
    out_dims, in_dims = layer.weight.shape
    twin = nn.Linear(in_dims, out_dims, bias="bias" in layer)
    twin.weight = layer.weight.astype(dtype)
    if "bias" in layer:
        twin.bias = layer.bias
    return twin


def calibration_grams(model, floats: dict, clip_targets: dict, batches: list,
                      image_token: int) -> dict:
    """path -> Gram blocks of each clip target's inputs over the calibration batches, with
    `floats` (path -> float linear) standing in for the fake-quantized layers.

    Under a launcher each rank runs its contiguous share of the batches and the Gram
    blocks (sums of X^T X) are all-summed."""
    quantized = dict(model.named_modules())
    recorders = {p: _GramRecorder(floats[p], g) for p, (_, g) in clip_targets.items()}
    lo, hi = dist.shard_range(len(batches))
    _swap(model, {**floats, **recorders})
    try:
        for b in batches[lo:hi]:
            mx.eval(vlm_logits(model, b["input_ids"], b["pixel_values"], image_token))
    finally:
        _swap(model, {p: quantized[p] for p in floats})
    if dist.size() == 1:
        return {p: r.gram for p, r in recorders.items()}
    out = {}
    for p, r in sorted(recorders.items()):
        if r.gram is None:  # no batch on this rank
            w_in, g = floats[p].weight.shape[1], clip_targets[p][1]
            r.gram = mx.zeros((w_in // g, g, g), dtype=mx.float32)
        out[p] = dist.all_sum(r.gram)
        mx.eval(out[p])
    return out


def _swap(model, new_modules: dict) -> None:
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten(list(new_modules.items())))


def clip_init(model, layers: dict, skip: list, batches: list, image_token: int, compute_dtype,
              scale_dtype, log=print) -> dict:
    """Clip-initialise the language model's fake-quantized linears among `layers`
    (path -> (bits, group)), except those whose name ends in one of `skip` (q/k in the paper).

    Calibration runs the float model: every layer in `layers` (the projector's too)
    computes with its latent weight meanwhile. Returns {path: {"rtn_error", "clip_error"}}."""
    from tqdm import tqdm

    from .plan import component_of

    modules = dict(model.named_modules())
    targets = {p: s for p, s in layers.items()
               if component_of(p) == "language" and p.rsplit(".", 1)[-1] not in skip}
    floats = {p: _float_twin(modules[p], compute_dtype) for p in layers}
    grams = calibration_grams(model, floats, targets, batches, image_token) if targets else {}
    searched = _split_clip_search(modules, grams, targets, scale_dtype) if dist.size() > 1 else {}
    stats = {}
    for p in tqdm(sorted(grams), desc="clip init", unit="layer", disable=dist.size() > 1):
        bits, group = targets[p]
        layer = modules[p]
        s, b, st = searched[p] if p in searched else search_clip(layer.weight, grams[p], bits, group,
                                                                 scale_dtype)
        stats[p] = st
        layer.weight = clip_weight(layer.weight, s, b, bits, group)
        if layer.learns_qparams:
            layer.scales, layer.biases = s, b
    if stats:
        rtn = sum(v["rtn_error"] for v in stats.values())
        clip = sum(v["clip_error"] for v in stats.values())
        log(f"clip init: {len(stats)} layers, calibration output error {rtn:.4g} -> {clip:.4g}")
    return stats


def _split_clip_search(modules: dict, grams: dict, targets: dict, scale_dtype) -> dict:
    """Under a launcher: rank r searches every W-th layer; the results are shared."""
    from tqdm import tqdm

    paths = sorted(grams)
    W, r = dist.size(), dist.rank()
    local = {}
    for p in tqdm(paths[r::W], desc="clip init", unit="layer", disable=not dist.is_main()):
        bits, group = targets[p]
        s, b, st = search_clip(modules[p].weight, grams[p], bits, group, scale_dtype)
        local[p] = (s.astype(mx.float32), b.astype(mx.float32),  # float32 already: scale_dtype
                    mx.array([st["rtn_error"], st["clip_error"]], dtype=mx.float32))  # only rounds
        mx.eval(local[p])
    out = {}
    for i, p in enumerate(paths):
        owner = i % W
        if p in local:
            mine = list(local[p])
        else:  # the owner's shapes and dtypes
            out_dims, in_dims = modules[p].weight.shape
            shape = (out_dims, in_dims // targets[p][1])
            mine = [mx.zeros(shape, dtype=mx.float32), mx.zeros(shape, dtype=mx.float32),
                    mx.zeros((2,), dtype=mx.float32)]
        s, b, st = dist.broadcast_from(owner, mine)
        out[p] = (s, b, {"rtn_error": float(st[0]), "clip_error": float(st[1])})
    return out
