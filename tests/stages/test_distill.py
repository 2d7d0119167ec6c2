"""Distillation and CE losses against straightforward numpy references."""

import mlx.core as mx
import numpy as np
import pytest

from speedq_mlx.stages import losses as D


def _np_logsoftmax(x):
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    B, L, V = 2, 7, 11
    s = rng.standard_normal((B, L, V)).astype(np.float32) * 2
    t = rng.standard_normal((B, L, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, (B, L))
    mask = np.zeros((B, L), np.int32)
    mask[0, 3:6] = 1
    mask[1, 2:7] = 1
    return s, t, ids, mask


def _ref_terms(s, t, ids, mask):
    ls, lt = _np_logsoftmax(s[:, :-1]), _np_logsoftmax(t[:, :-1])
    m = mask[:, 1:].astype(bool)
    fwd = (np.exp(lt) * (lt - ls)).sum(-1)[m]
    rev = (np.exp(ls) * (ls - lt)).sum(-1)[m]
    nll = -np.take_along_axis(ls, ids[:, 1:, None], -1)[..., 0][m]
    return fwd, rev, nll, ls[m]


def test_losses_match_numpy_reference(batch):
    s, t, ids, mask = batch
    fwd, rev, nll, ls = _ref_terms(s, t, ids, mask)
    args = (mx.array(s), mx.array(t), mx.array(ids), mx.array(mask))
    assert float(D.distill_loss(*args, kind="forward")) == pytest.approx(fwd.mean(), rel=1e-5)
    assert float(D.distill_loss(*args, kind="reverse")) == pytest.approx(rev.mean(), rel=1e-5)
    g = 0.3
    assert float(D.distill_loss(*args, kind="cakld", gamma=g)) == pytest.approx(
        (g * rev + (1 - g) * fwd).mean(), rel=1e-5)
    ce_args = (mx.array(s), mx.array(ids), mx.array(mask))
    assert float(D.cross_entropy(*ce_args)) == pytest.approx(nll.mean(), rel=1e-5)
    eps = 0.1
    smooth = ((1 - eps) * nll - eps * ls.mean(-1)).mean()
    assert float(D.cross_entropy(*ce_args, label_smoothing=eps)) == pytest.approx(smooth, rel=1e-5)


def test_only_answer_tokens_count(batch):
    s, t, ids, mask = batch
    s2 = s.copy()
    s2[0, 0:2, 0] += 50.0  # positions whose next token is outside the answer
    a = D.distill_loss(mx.array(s), mx.array(t), mx.array(ids), mx.array(mask))
    b = D.distill_loss(mx.array(s2), mx.array(t), mx.array(ids), mx.array(mask))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    s3 = s.copy()
    s3[0, 2, 0] += 5.0  # predicts token 3, the first answer token: must count
    c = D.distill_loss(mx.array(s3), mx.array(t), mx.array(ids), mx.array(mask))
    assert abs(float(c) - float(a)) > 1e-3


def test_self_distillation_is_zero_and_topk_is_exact_when_k_is_vocab(batch):
    s, t, ids, mask = batch
    args = (mx.array(ids), mx.array(mask))
    assert float(D.distill_loss(mx.array(s), mx.array(s), *args)) == pytest.approx(0, abs=1e-6)
    full = D.distill_loss(mx.array(s), mx.array(t), *args, kind="forward")
    topk = D.distill_loss(mx.array(s), D.teacher_topk(mx.array(t), 11), *args, kind="forward")
    assert float(topk) == pytest.approx(float(full), rel=1e-4)
    # coarse-grained KL never exceeds the full KL
    for kind in ("forward", "reverse", "cakld"):
        k3 = D.distill_loss(mx.array(s), D.teacher_topk(mx.array(t), 3), *args, kind=kind)
        assert float(k3) <= float(D.distill_loss(mx.array(s), mx.array(t), *args, kind=kind)) + 1e-6


def test_teacher_confidence(batch):
    s, t, ids, mask = batch
    total, n = D.teacher_confidence(mx.array(t), mx.array(ids), mx.array(mask))
    lt = _np_logsoftmax(t[:, :-1])
    m = mask[:, 1:].astype(bool)
    assert n == m.sum()
    assert total / n == pytest.approx(np.exp(lt).max(-1)[m].mean(), rel=1e-5)
    total_k, _ = D.teacher_confidence(D.teacher_topk(mx.array(t), 4), mx.array(ids), mx.array(mask))
    assert total_k == pytest.approx(total, rel=1e-5)


def test_row_losses_equal_the_full_logit_losses(batch):
    """The stages score only the rows whose next token counts (forward.row_logits): the same
    CE, KL and confidence as the full-logit functions with the mask."""
    s, t, ids, mask = batch
    b, p, nxt = D.answer_rows(mx.array(ids), mx.array(mask))
    assert [(int(i), int(j)) for i, j in zip(b.tolist(), p.tolist())] == list(zip(*np.nonzero(mask[:, 1:])))
    np.testing.assert_array_equal(np.array(nxt), ids[:, 1:][mask[:, 1:].astype(bool)])
    S, T = mx.array(s)[b, p], mx.array(t)[b, p]
    full = (mx.array(s), mx.array(t), mx.array(ids), mx.array(mask))
    for kind in ("forward", "reverse", "cakld"):
        assert float(D.distill_rows(S, T, kind, 0.3)) == pytest.approx(float(D.distill_loss(*full, kind=kind, gamma=0.3)), rel=1e-5)
    assert float(D.ce_rows(S, nxt, 0.1)) == pytest.approx(float(D.cross_entropy(mx.array(s), mx.array(ids), mx.array(mask), 0.1)), rel=1e-5)
    idx, lp = D.teacher_topk(mx.array(t), 4)
    rows = (idx[b, p], lp[b, p])
    assert float(D.distill_rows(S, rows, "forward")) == pytest.approx(float(D.distill_loss(mx.array(s), (idx, lp), mx.array(ids), mx.array(mask), "forward")), rel=1e-5)
    conf, n = D.confidence_rows(T)
    ref_conf, ref_n = D.teacher_confidence(mx.array(t), mx.array(ids), mx.array(mask))
    assert n == ref_n and conf == pytest.approx(ref_conf, rel=1e-5)
