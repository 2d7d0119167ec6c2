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


def _rtn(ckpt, bits, group=64):
    model = model_io.load_model(ckpt, mx.float32)
    settings = {"vision": (bits, group), "projector": (bits, group), "language": (bits, group),
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
    for bits, group in ((4, 32), (4, 64), (3, 64), (2, 64)):
        got = _text_logits(_rtn(smollm_ckpt, bits, group), ids)
        stats[bits if group == 64 else "4g32"] = ((got.argmax(-1) == ref.argmax(-1)).mean(), _kl(ref, got))
    print("RTN on SmolLM2-135M (top-1 agreement, KL):", stats)
    # SmolLM2-135M's linears already sit on a 4-bit g32 grid (its GGUF is Q4_1): 4-bit g32
    # re-quantization is a lossless re-grid (only the embeddings, Q8_0 in the file, move), and
    # g64 costs what re-gridding does; the real 4-bit check is on Qwen2.5 (benchmarks/peers.py).
    # Measured (150 tokens; RTN = per group the better of MLX's zero-exact grid and min/max):
    # 4g32 0.86 / KL 0.05, 4g64 0.69 / 0.30, 3-bit 0.48 / 1.47, 2-bit 0.02 / 7.7 (min/max alone:
    # 4g64 0.73 / 0.31, 2-bit 0.00 / 10.6). Top-1 on 150 tokens moves +-0.04 (one SE), so the
    # g64 check is on KL, where the grid choice helps, with top-1 at a noise-safe bound.
    assert stats["4g32"][0] >= 0.85 and stats["4g32"][1] < 0.1
    assert stats[4][0] >= 0.65 and stats[4][1] < 0.35
    assert stats[2][0] < 0.2 and stats[2][1] > 5  # 2-bit RTN collapses
    assert stats[4][1] < stats[3][1] < stats[2][1]
