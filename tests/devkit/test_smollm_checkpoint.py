"""The SmolLM2-135M InternVL checkpoint must be a working language model, not just loadable:
a wrong q/k un-permutation or tokenizer still loads but answers badly."""

from __future__ import annotations

import math
import mlx.core as mx
import pytest

from devkit.testing import ENGLISH_TEXT

pytestmark = pytest.mark.real_weights

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PARAGRAPH = ENGLISH_TEXT


@pytest.fixture(scope="module")
def built(smollm_ckpt):
    from mlx_vlm.utils import load_model
    from transformers import PreTrainedTokenizerFast

    return load_model(smollm_ckpt), PreTrainedTokenizerFast.from_pretrained(smollm_ckpt)


def test_tokenizer_and_config(built):
    model, tok = built
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.tokenize("<img><IMG_CONTEXT></img>") == ["<img>", "<IMG_CONTEXT>", "</img>"]
    assert "<|im_start|>" in tok.chat_template
    emb = model.language_model.model.embed_tokens.weight
    assert emb.shape == (len(tok), 576) and emb.dtype == mx.float32


def test_greedy_answer_mentions_paris(built):
    model, tok = built
    ids = tok.encode(PROMPT)
    start = len(ids)
    for _ in range(20):
        nxt = int(mx.argmax(model.language_model(mx.array([ids])).logits[0, -1]).item())
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    assert "Paris" in tok.decode(ids[start:])


def test_perplexity_on_english(built):
    # Measured 11.0; without the q/k un-permutation it is ~75.
    model, tok = built
    ids = tok.encode(PARAGRAPH)
    logits = model.language_model(mx.array([ids])).logits[0, :-1].astype(mx.float32)
    target = mx.take_along_axis(logits, mx.array(ids[1:])[:, None], axis=-1)[:, 0]
    nll = (mx.logsumexp(logits, axis=-1) - target).mean()
    assert math.exp(nll.item()) < 25
