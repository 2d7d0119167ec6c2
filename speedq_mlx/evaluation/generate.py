"""Greedy generation for evaluation, prompted exactly as the model was trained.

mlx-vlm's generate renders InternVL prompts in a generic template and needs a
processor that a Hugging Face InternVL folder does not ship; evaluation must prompt a
full-precision checkpoint and its quantized artifact identically. So the prompt is built
with the data layer (the checkpoint's own chat template, `<image>` expanded to
`<IMG_CONTEXT>` tokens, the same tiling as training) and decoded here with a KV cache on
the model's own modules. Timings are kept apart for the prompt and for the new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..data import images as img
from ..data.encode import Encoder, expand_images
from ..model import forward
from ..model.chat_template import render
from ..model.internvl import IMAGE


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float  # prompt (and image) processing, up to the first new token
    decode_s: float  # the remaining new tokens


def prompt(enc: Encoder, question: str, images: list[Path] = ()) -> tuple[list[int], mx.array | None]:
    """Token ids and pixel tiles of one user turn in the model's template, ready for an answer.

    Without `<image>` placeholders the images go before the question (as in training).
    """
    if images and IMAGE not in question:
        question = f"{IMAGE}\n" * len(images) + question
    pixels = [img.tiles(enc.processor, Path(p)) for p in images]
    messages = expand_images([{"role": "user", "content": question}],
                             [p.shape[0] for p in pixels], enc.num_image_token)
    text = render(enc.template, messages, add_generation_prompt=True)
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids), (mx.concatenate(pixels, axis=0) if pixels else None)


def generate(model, enc: Encoder, ids: list[int], pixel_values, eos_ids, max_tokens: int,
             ignore_eos: bool = False) -> Generation:
    """Greedy decoding of up to `max_tokens` new tokens (stops at an end-of-turn token
    unless `ignore_eos`, used to time a fixed number of tokens)."""
    from mlx_vlm.models.cache import KVCache

    lm = model.language_model
    cache = [KVCache() for _ in lm.layers]
    t0 = time.perf_counter()
    emb = forward.input_embeddings(model, mx.array([ids], dtype=mx.int32), pixel_values,
                                   enc.image_token_id)
    tok = int(mx.argmax(lm(None, inputs_embeds=emb, cache=cache).logits[0, -1]).item())
    t1 = time.perf_counter()
    out: list[int] = []
    while len(out) < max_tokens and (ignore_eos or tok not in eos_ids):
        out.append(tok)
        if len(out) == max_tokens:
            break
        logits = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        tok = int(mx.argmax(logits[0, -1]).item())
    t2 = time.perf_counter()
    text = enc.tokenizer.decode(out, skip_special_tokens=True)
    return Generation(text.strip(), out, len(ids), t1 - t0, t2 - t1)


def speed(gens: list[Generation]) -> dict:
    """Prompt and generation throughput over several generations (tokens per second).

    Generation speed counts the tokens after the first one (that one comes out of the
    prompt pass) over the time spent producing them, as mlx-lm reports it.
    """
    p_tok = sum(g.prompt_tokens for g in gens)
    p_s = sum(g.prefill_s for g in gens)
    g_tok = sum(max(len(g.tokens) - 1, 0) for g in gens)
    g_s = sum(g.decode_s for g in gens if len(g.tokens) > 1)
    return {"prompt_tokens": p_tok, "prompt_tokens_per_s": p_tok / p_s if p_s else None,
            "generated_tokens": sum(len(g.tokens) for g in gens),
            "generation_tokens_per_s": g_tok / g_s if g_s else None}
