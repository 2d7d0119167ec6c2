"""How much each module's quantization costs: a diagonal-Fisher estimate of the KL it adds.

Quantizing a weight matrix W to Q(W) moves the model by delta = Q(W) - W. Around the
full-precision model the KL(fp || quantized) has no first-order term (it is minimal, 0,
at delta = 0), and its second-order term is 0.5 * delta^T F delta with F the Fisher
information of the model's predictive distribution. Keeping F's diagonal:

    damage(module, setting) = 0.5 * sum_ij F_ij * (Q(W)_ij - W_ij)^2     (nats per token)

F_ij is estimated as the mean squared gradient of the next-token loss w.r.t. W_ij with
the labels *sampled from the full-precision model's own distribution* at every scored
position (not the text's tokens: that would be the "empirical Fisher", which is not the
KL's curvature). Labels drawn independently per position make the cross-position terms
of a window's squared gradient vanish in expectation, so one backward pass per window
gives an unbiased estimate of the per-token Fisher summed over its positions. Every
module's damage is then in the same unit - expected nats of KL per scored token on the
calibration data - so damages add up across modules and compare across components, which
a knapsack over bits needs. (mlx-lm's dynamic_quant scores a module by the first-order
alignment of the gradient of KL at a low-bit model with the step to a high-bit one, per
parameter, to pick between two settings; a second-order estimate at the full-precision
model prices any number of candidate settings for every module at once.)

Q(W) is the project's RTN quantizer (format.rtn_fit, the grid rtn_params exports) with scales in
the output dtype: exactly what a round-to-nearest export writes. Off-diagonal curvature and
what SPEED-Q's stages recover are ignored: the estimate ranks settings, it does not
predict the final quality. A module over 8M weights (a 151k-token lm_head) is priced on a
seeded random subset of its rows, scaled up: unbiased, and a few % of noise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.forward import row_logits
from . import format as Q

CHUNK = 1 << 22  # weights per damage computation (bounds the quantizer's temporaries)
MAX_WEIGHTS = 1 << 23  # a module is priced on at most this many weights (a random row subset)


def sampled_nll(model, batch: dict, key, image_token: int) -> mx.array:
    """Summed next-token NLL of labels drawn from the model's own distribution at the scored
    positions (batch["start"] on: after the image, for image samples)."""
    ids = batch["input_ids"]
    t = mx.arange(batch.get("start", 0), ids.shape[1])
    lg = row_logits(model, ids, batch.get("pixel_values"), image_token, (mx.zeros_like(t), t))
    lg = lg.astype(mx.float32)
    labels = mx.random.categorical(mx.stop_gradient(lg), key=key)
    lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
    return -mx.take_along_axis(lp, labels[:, None], axis=-1).sum()


def scored_tokens(batch: dict) -> int:
    return batch["input_ids"].shape[1] - batch.get("start", 0)


def fisher_diagonal(model, batches: list, paths, image_token: int, seed: int = 0) -> tuple[dict, int]:
    """(path -> per-weight Fisher estimate (fp32, the weight's shape), scored tokens): one
    backward pass per batch, squared gradients accumulated into one dict, grads freed."""
    from tqdm import tqdm

    modules = dict(model.named_modules())
    paths = sorted(paths)
    model.freeze()
    for p in paths:
        modules[p].unfreeze(keys=["weight"], recurse=False)
    grad_fn = nn.value_and_grad(model, lambda b, k: sampled_nll(model, b, k, image_token))
    acc = {p: mx.zeros(modules[p].weight.shape, mx.float32) for p in paths}
    key = mx.random.key(seed)
    n_tokens = 0
    try:
        for batch in tqdm(batches, desc="sensitivity", unit="batch", leave=False,
                          disable=len(batches) < 4):
            key, sub = mx.random.split(key)
            _, grads = grad_fn(batch, sub)
            for name, g in tree_flatten(grads):
                path = name[: -len(".weight")]
                acc[path] = acc[path] + g.astype(mx.float32) ** 2
            del grads
            mx.eval(acc)
            n_tokens += scored_tokens(batch)
    finally:
        model.unfreeze()
    return {p: a / max(n_tokens, 1) for p, a in acc.items()}, n_tokens


def rtn_error(w: mx.array, setting, scale_dtype) -> mx.array:
    """Q(W) - W for the project's RTN at `setting` (None: the float export, a cast)."""
    if setting is None:
        return w.astype(scale_dtype).astype(w.dtype) - w if scale_dtype is not None else mx.zeros_like(w)
    return Q.rtn_fit(w, *setting, scale_dtype)[2] - w


def damage(w: mx.array, fisher: mx.array, setting, scale_dtype, chunk: int = CHUNK) -> float:
    """0.5 * sum F * (Q(W) - W)^2, over row blocks of at most `chunk` weights."""
    step = max(1, chunk // w.shape[1])
    total = 0.0
    for i in range(0, w.shape[0], step):
        err = rtn_error(w[i : i + step], setting, scale_dtype)
        total += float(0.5 * (fisher[i : i + step] * err * err).sum())
    return total


def priced_rows(fisher: mx.array, max_weights: int = MAX_WEIGHTS, seed: int = 0) -> tuple[mx.array, float]:
    """(rows to price, scale): the rows with Fisher mass (an embedding's unseen tokens add 0),
    and of a larger module a seeded uniform sample of them, `scale` making the sum unbiased."""
    import numpy as np

    rows = np.flatnonzero(np.array(fisher.sum(axis=1) > 0))
    keep = max(1, max_weights // fisher.shape[1])
    if rows.size <= keep:
        return mx.array(rows), 1.0
    sample = np.sort(np.random.default_rng(seed).choice(rows, keep, replace=False))
    return mx.array(sample), rows.size / keep


def damages(model, fisher: dict, settings: dict, scale_dtype, max_weights: int = MAX_WEIGHTS) -> dict:
    """path -> {setting: damage} for every candidate setting of every module in `fisher`
    (a module over `max_weights` weights priced on a random subset of its rows, scaled)."""
    from tqdm import tqdm

    modules = dict(model.named_modules())
    out = {}
    for p in tqdm(sorted(fisher), desc="damage per setting", unit="module", leave=False,
                  disable=len(fisher) < 20):
        rows, scale = priced_rows(fisher[p], max_weights)
        if rows.size == 0:
            out[p] = {s: 0.0 for s in settings[p]}
            continue
        w = mx.stop_gradient(modules[p].weight).astype(mx.float32)[rows]
        f = fisher[p][rows]
        out[p] = {s: scale * damage(w, f, s, scale_dtype) for s in settings[p]}
    return out
