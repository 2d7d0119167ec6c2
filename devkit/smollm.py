"""An InternVL-layout checkpoint whose language model is the real SmolLM2-135M-Instruct.

Random tiny models say nothing about quantization quality; this one has real pretrained
text weights (read from a Q4_1 GGUF, dequantized to float32) under a small random vision
tower, so tests can compare perplexity and generations before and after quantization.
A Llama decoder is a Qwen2 decoder with zero q/k/v biases, which is what mlx-vlm's
internvl_chat language model expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from speedq_mlx.model.internvl import SPECIAL_TOKENS
from speedq_mlx.model.synthetic import internvl_config, random_weights, write_checkpoint

_SHARED_GGUF = (
    Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
DEFAULT_GGUF = Path(os.environ.get("SPEEDQ_SMOLLM_GGUF", _SHARED_GGUF))

GROUP_SIZE = 32

# llama GGUF tensor name -> HF name inside a decoder layer
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _dequantized(tensors: dict, name: str) -> np.ndarray:
    """float32 values of a GGUF tensor; quantized ones come as weight/scales/biases."""
    w = tensors[name + ".weight"]
    if name + ".scales" not in tensors:
        return np.array(w.astype(mx.float32))
    scales = tensors[name + ".scales"]
    # packed uint32 columns * 32 bits == groups * group_size * bits
    bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
    out = mx.dequantize(w, scales, tensors[name + ".biases"], group_size=GROUP_SIZE, bits=bits)
    return np.array(out.astype(mx.float32))


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the GGUF q/k row order (pairs interleaved per head) to HF's rotate-half order.

    GGUF keeps, within each head, rows as (x0, x_{d/2}, x1, x_{d/2+1}, ...); HF keeps
    the first half of the head then the second half.
    """
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_tokenizer(gguf_metadata: dict):
    """SmolLM2's byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges,
    with InternVL's image/grounding tokens added (they are not in SmolLM2's vocab)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in gguf_metadata["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM2 splits every digit on its own before the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) must match whole, never be split by BPE.
    types = np.array(gguf_metadata["tokenizer.ggml.token_type"]).tolist()
    control = [t for t, ty in zip(tokens, types) if ty == 3]
    extra = [t for t in SPECIAL_TOKENS if t not in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control + extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=8192,
        chat_template=gguf_metadata.get("tokenizer.chat_template"),
    )


def _u(md: dict, key: str):
    """A scalar from GGUF metadata (mx.load gives 0-d arrays)."""
    return md[key].item()


def build_smollm_checkpoint(out_dir, gguf_path=DEFAULT_GGUF, seed: int = 0) -> Path:
    """Write an InternVL2-layout HF checkpoint: real SmolLM2 text weights (float32),
    small random vision tower and projector."""
    tensors, md = mx.load(str(gguf_path), return_metadata=True)
    tokenizer = gguf_tokenizer(md)
    n_heads = _u(md, "llama.attention.head_count")
    n_kv = _u(md, "llama.attention.head_count_kv")
    n_layers = _u(md, "llama.block_count")
    hidden = _u(md, "llama.embedding_length")
    config = internvl_config(
        vision={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        llm={
            "hidden_size": hidden,
            "intermediate_size": _u(md, "llama.feed_forward_length"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "num_hidden_layers": n_layers,
            "max_position_embeddings": _u(md, "llama.context_length"),
            "max_window_layers": n_layers,
            "sliding_window": _u(md, "llama.context_length"),
            "rms_norm_eps": float(f'{_u(md, "llama.attention.layer_norm_rms_epsilon"):.6g}'),
            "rope_theta": float(_u(md, "llama.rope.freq_base")),
            "tie_word_embeddings": True,
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": None,
            "torch_dtype": "float32",
        },
        max_dynamic_patch=6,
        torch_dtype="float32",
    )
    # Random vision tower / mlp1; the language-model entries are replaced below.
    weights = {
        k: v for k, v in random_weights(config, seed).items() if not k.startswith("language_model.")
    }

    lm = "language_model.model."
    embed = _dequantized(tensors, "token_embd")
    # New InternVL tokens get the mean embedding: harmless under tied output weights.
    grow = np.repeat(embed.mean(0, keepdims=True), len(tokenizer) - embed.shape[0], axis=0)
    weights[lm + "embed_tokens.weight"] = np.concatenate([embed, grow])
    weights[lm + "norm.weight"] = _dequantized(tensors, "output_norm")
    for i in range(n_layers):
        for g, h in _LAYER_NAMES.items():
            w = _dequantized(tensors, f"blk.{i}.{g}")
            if g in ("attn_q", "attn_k"):
                w = _unpermute_rope(w, n_heads if g == "attn_q" else n_kv)
            weights[f"{lm}layers.{i}.{h}.weight"] = w
        for p in ("q", "k", "v"):
            rows = weights[f"{lm}layers.{i}.self_attn.{p}_proj.weight"].shape[0]
            weights[f"{lm}layers.{i}.self_attn.{p}_proj.bias"] = np.zeros(rows, np.float32)
    return write_checkpoint(out_dir, config, weights, tokenizer)
