"""How closely a model's next-token distributions follow a reference's, on the same tokens.

Per predicted token: the negative log-likelihood of the true next token under each model
(perplexity = exp of its mean), KL(REF || MODEL) (what distillation minimises, in nats),
and whether both models' most likely token is the same (top-1 agreement). Positions are
shifted as in stages/losses.py: logits at t predict token t+1, selected by mask[:, 1:].
Sums are accumulated batch by batch and divided once at the end, so every token weighs
the same whatever the batch it came in.
"""

from __future__ import annotations

import mlx.core as mx

from ..model import forward
from ..stages.losses import kl_terms, log_softmax, shift

KEYS = ("tokens", "nll_model", "nll_ref", "kl", "agree")


def batch_sums(model_logits: mx.array, ref_logits: mx.array, input_ids: mx.array,
               loss_mask: mx.array) -> dict:
    """Sums over the masked positions of one batch (see KEYS)."""
    if model_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {model_logits.shape} vs {ref_logits.shape}")
    kl_ref_model, _, m = kl_terms(model_logits, ref_logits, input_ids, loss_mask)
    lg_m, tgt, _ = shift(model_logits, input_ids, loss_mask)
    lg_r = ref_logits[:, :-1]

    def nll(lg):
        return -mx.take_along_axis(log_softmax(lg), tgt[..., None], axis=-1)[..., 0]

    agree = (mx.argmax(lg_m, axis=-1) == mx.argmax(lg_r, axis=-1)).astype(mx.float32)
    out = {"tokens": m.sum(), "nll_model": (nll(lg_m) * m).sum(), "nll_ref": (nll(lg_r) * m).sum(),
           "kl": (kl_ref_model * m).sum(), "agree": (agree * m).sum()}
    mx.eval(out)
    return {k: float(v) for k, v in out.items()}


def add(total: dict, part: dict) -> dict:
    return {k: total.get(k, 0.0) + part[k] for k in KEYS}


def summary(sums: dict) -> dict:
    """Per-token means of accumulated sums: perplexities, mean KL, agreement."""
    import math

    n = sums.get("tokens", 0.0)
    if not n:
        return {"tokens": 0}
    return {"tokens": int(n), "ppl_model": math.exp(sums["nll_model"] / n),
            "ppl_ref": math.exp(sums["nll_ref"] / n), "kl": sums["kl"] / n,
            "top1_agreement": sums["agree"] / n}


def text_fidelity(model, ref, windows: mx.array, batch_size: int) -> dict:
    """Both models on [n, L] token windows (text only); every position after the first
    is scored."""
    sums: dict = {}
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        mask = mx.ones(ids.shape, dtype=mx.int32)
        sums = add(sums, batch_sums(forward.logits(model, ids), forward.logits(ref, ids), ids, mask))
    return summary(sums)


def data_fidelity(model, ref, batches, image_token: int) -> dict:
    """Both models on collated image-text batches (data.collate); answer tokens are scored."""
    sums: dict = {}
    for b in batches:
        ids, pv = b["input_ids"], b["pixel_values"]
        lm = forward.logits(model, ids, pv, image_token)
        lr = forward.logits(ref, ids, pv, image_token)
        sums = add(sums, batch_sums(lm, lr, ids, b["loss_mask"]))
    return summary(sums)
