"""RTN on real weights (SmolLM2-135M as the language model): the baseline later stages must beat."""

import mlx.core as mx
import numpy as np
import pytest

from speedq_mlx.model import io as model_io
from speedq_mlx.quant.plan import apply_plan, build_plan

from devkit.testing import ENGLISH_TEXT

pytestmark = pytest.mark.real_weights


def _text_logits(model, ids):
    return np.array(model.language_model(mx.array([ids])).logits[0].astype(mx.float32))


def _rtn(ckpt, bits):
    model = model_io.load_model(ckpt, mx.float32)
    settings = {"vision": (bits, 64), "projector": (bits, 64), "language": (bits, 64),
                "embeddings": (4, 32), "lm_head": (4, 32)}
    apply_plan(model, build_plan(model, settings), scale_dtype=mx.float16)
    return model


def _kl(p_logits, q_logits):
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_rtn_top1_agreement_4bit_high_2bit_worse(smollm_ckpt):
    tok = model_io.load_tokenizer(smollm_ckpt)
    ids = tok.encode(ENGLISH_TEXT)
    assert len(ids) >= 150
    ref = _text_logits(model_io.load_model(smollm_ckpt, mx.float32), ids)
    stats = {}
    for bits in (4, 3, 2):
        got = _text_logits(_rtn(smollm_ckpt, bits), ids)
        stats[bits] = ((got.argmax(-1) == ref.argmax(-1)).mean(), _kl(ref, got))
    print("RTN on SmolLM2-135M (top-1 agreement, KL):", stats)
    # Measured (150 tokens): 4-bit 0.73 / KL 0.31, 3-bit 0.39 / 2.0, 2-bit 0.0 / 10.3.
    # mlx's own nn.quantize gives the same 4-bit g64 figures on this model: SmolLM2-135M's
    # weights sit on a 4-bit g32 grid, and re-gridding them at g64 costs that much.
    assert stats[4][0] > 0.65 and stats[4][1] < 0.5
    assert stats[2][0] < 0.2 and stats[2][1] > 5  # 2-bit RTN collapses
    assert stats[4][1] < stats[3][1] < stats[2][1]
