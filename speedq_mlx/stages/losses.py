"""Losses of SPEED-Q stages 2 and 3, all per answer token with shifted targets.

Position t of the logits predicts token t+1, so a loss mask over tokens (1 on the
assistant's answer tokens) selects logits[:, :-1] with mask[:, 1:]. Every loss is a
mean over those tokens: the KL and the CE are balanced per token (the authors' code
sums one and averages the other, and masks unshifted logits; we do not).

The teacher is either live logits [B, L, V] or a cached top-k summary
(indices [B, L, k] and the teacher's log-probabilities there). With top-k, both
distributions are compared on k + 1 buckets (the k tokens and "everything else"), an
exact coarse-graining, so forward, reverse and confidence-aware KL all stay defined.
"""

from __future__ import annotations

import mlx.core as mx


def shift(logits: mx.array, input_ids: mx.array, loss_mask: mx.array):
    """(logits predicting each next token, the next tokens, their mask)."""
    return logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].astype(mx.float32)


def masked_mean(per_token: mx.array, mask: mx.array) -> mx.array:
    return (per_token * mask).sum() / mx.maximum(mask.sum(), 1.0)


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def cross_entropy(logits, input_ids, loss_mask, label_smoothing: float = 0.0) -> mx.array:
    """Next-token CE on answer tokens, optionally label-smoothed."""
    lg, tgt, m = shift(logits, input_ids, loss_mask)
    lp = log_softmax(lg)
    nll = -mx.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * lp.mean(axis=-1)
    return masked_mean(nll, m)


def _kl(lp: mx.array, lq: mx.array) -> mx.array:
    """KL(P || Q) over the last axis from log-probabilities."""
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


def _bucketed(lp_full: mx.array, idx: mx.array) -> mx.array:
    """log-probs on k + 1 buckets: the k indexed tokens and the rest."""
    top = mx.take_along_axis(lp_full, idx, axis=-1)
    return _with_rest(top)


def _with_rest(top_lp: mx.array) -> mx.array:
    rest = mx.log(mx.maximum(1.0 - mx.exp(top_lp).sum(axis=-1, keepdims=True), 1e-12))
    return mx.concatenate([top_lp, rest], axis=-1)


def teacher_topk(teacher_logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(indices, log-probs) of the teacher's k most likely tokens at every position."""
    lp = log_softmax(teacher_logits)
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[..., :k]
    return idx.astype(mx.int32), mx.take_along_axis(lp, idx, axis=-1)


def kl_terms(student_logits, teacher, input_ids, loss_mask):
    """Per-token (forward KL(T||S), reverse KL(S||T)) and the shifted mask.

    `teacher` is live logits [B, L, V] or a (indices, log-probs) top-k pair.
    """
    lg, _, m = shift(student_logits, input_ids, loss_mask)
    ls = log_softmax(lg)
    if isinstance(teacher, tuple):
        idx, t_lp = teacher[0][:, :-1], teacher[1][:, :-1].astype(mx.float32)
        lt = _with_rest(t_lp)
        ls = _bucketed(ls, idx)
    else:
        lt = log_softmax(teacher[:, :-1])
    return _kl(lt, ls), _kl(ls, lt), m


def distill_loss(student_logits, teacher, input_ids, loss_mask, kind: str = "cakld",
                 gamma: float = 0.5) -> mx.array:
    """cakld: gamma * KL(S||T) + (1 - gamma) * KL(T||S) (BitDistiller); or forward / reverse."""
    fwd, rev, m = kl_terms(student_logits, teacher, input_ids, loss_mask)
    if kind == "cakld":
        per_token = gamma * rev + (1 - gamma) * fwd
    elif kind == "forward":
        per_token = fwd
    elif kind == "reverse":
        per_token = rev
    else:
        raise ValueError(f"unknown distillation loss {kind!r}")
    return masked_mean(per_token, m)


def teacher_confidence(teacher, input_ids, loss_mask) -> tuple[float, float]:
    """(sum of the teacher's top-1 probability over answer tokens, token count)."""
    if isinstance(teacher, tuple):
        top1 = mx.exp(teacher[1][:, :-1].astype(mx.float32)).max(axis=-1)
    else:
        top1 = mx.exp(log_softmax(teacher[:, :-1])).max(axis=-1)
    m = loss_mask[:, 1:].astype(mx.float32)
    return float((top1 * m).sum()), float(m.sum())


# ---------------------------------------------------------------- on scored rows only
# The stages compute logits only where a next token is scored (forward.row_logits): rows
# are (batch index, position) pairs, the same selection as mask[:, 1:] above.


def answer_rows(input_ids, loss_mask) -> tuple[mx.array, mx.array, mx.array]:
    """(batch index, position, next token) of every position whose next token is scored."""
    import numpy as np

    b, t = np.nonzero(np.array(loss_mask)[:, 1:])
    nxt = np.array(input_ids)[b, t + 1]
    return mx.array(b.astype(np.int32)), mx.array(t.astype(np.int32)), mx.array(nxt.astype(np.int32))


def _row_mean(x: mx.array) -> mx.array:
    return x.sum() / max(x.shape[0], 1)


def ce_rows(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """cross_entropy on [N, V] row logits and their [N] next tokens."""
    lp = log_softmax(logits)
    nll = -mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * lp.mean(axis=-1)
    return _row_mean(nll)


def kl_rows(student_logits: mx.array, teacher) -> tuple[mx.array, mx.array]:
    """Per-row (KL(T||S), KL(S||T)); teacher: [N, V] logits or an (indices, log-probs) [N, k] pair."""
    ls = log_softmax(student_logits)
    if isinstance(teacher, tuple):
        lt, ls = _with_rest(teacher[1].astype(mx.float32)), _bucketed(ls, teacher[0])
    else:
        lt = log_softmax(teacher)
    return _kl(lt, ls), _kl(ls, lt)


def distill_rows(student_logits, teacher, kind: str = "cakld", gamma: float = 0.5) -> mx.array:
    """distill_loss on rows."""
    fwd, rev = kl_rows(student_logits, teacher)
    if kind == "cakld":
        return _row_mean(gamma * rev + (1 - gamma) * fwd)
    if kind == "forward":
        return _row_mean(fwd)
    if kind == "reverse":
        return _row_mean(rev)
    raise ValueError(f"unknown distillation loss {kind!r}")


def confidence_rows(teacher) -> tuple[float, float]:
    """teacher_confidence on rows: (sum of the teacher's top-1 probability, row count)."""
    lp = teacher[1].astype(mx.float32) if isinstance(teacher, tuple) else log_softmax(teacher)
    return float(mx.exp(lp).max(axis=-1).sum()), float(lp.shape[0])
