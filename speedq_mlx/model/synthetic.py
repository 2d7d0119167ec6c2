"""Write InternVL-family checkpoints in the Hugging Face layout (model_type internvl_chat).

Builds `tiny-random` (the registry's smoke-test model) and the models that tests and
benchmarks run on without a model hub: the
config keys, parameter names and tensor layouts are those of OpenGVLab/InternVL2-1B
(PyTorch conventions: Linear weights [out, in], patch conv [out, in, kh, kw]).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .internvl import DEFAULT_TEMPLATE, END_OF_TURN, SPECIAL_TOKENS


def internvl_config(vision: dict, llm: dict, **top) -> dict:
    """A config.json dict with InternVL2-1B's keys; `vision` / `llm` override sizes."""
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_channels": 3,
        "image_size": 448,
        "patch_size": 14,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "qk_normalization": False,
        "use_flash_attn": False,
        "drop_path_rate": 0.0,
        "initializer_factor": 1.0,
        "torch_dtype": "bfloat16",
        **vision,
    }
    llm_config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "vocab_size": 151655,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
        **llm,
    }
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision_config["image_size"],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": DEFAULT_TEMPLATE,
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "bfloat16",
        "vision_config": vision_config,
        "llm_config": llm_config,
    }
    config.update(top)
    return config


def tiny_config(vocab_size: int) -> dict:
    """A few-hundred-thousand-parameter InternVL2-layout config (input dims multiples of 128)."""
    return internvl_config(
        vision={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        llm={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "max_position_embeddings": 4096,
            "vocab_size": vocab_size,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        max_dynamic_patch=6,
    )


def random_weights(config: dict, seed: int = 0, dtype=np.float32, std: float = 0.02) -> dict:
    """HF-layout random weights for an internvl_chat config (numpy arrays)."""
    rng = np.random.default_rng(seed)
    v, t = config["vision_config"], config["llm_config"]
    vh, vf, L = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    th, tf, TL = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads, kv = t["num_attention_heads"], t["num_key_value_heads"]
    hd = th // heads
    ps, img = v["patch_size"], v["image_size"]
    npos = (img // ps) ** 2 + 1
    shuffle = int(1 / config["downsample_ratio"]) ** 2
    w: dict[str, np.ndarray] = {}

    def normal(*shape, scale=std):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def ones(n):
        return np.ones(n, dtype)

    def zeros(n):
        return np.zeros(n, dtype)

    e = "vision_model.embeddings."
    w[e + "class_embedding"] = normal(1, 1, vh)
    w[e + "patch_embedding.weight"] = normal(vh, 3, ps, ps, scale=0.05)
    w[e + "patch_embedding.bias"] = zeros(vh)
    w[e + "position_embedding"] = normal(1, npos, vh)
    for i in range(L):
        p = f"vision_model.encoder.layers.{i}."
        w[p + "attn.qkv.weight"] = normal(3 * vh, vh)
        w[p + "attn.qkv.bias"] = normal(3 * vh)
        w[p + "attn.proj.weight"] = normal(vh, vh)
        w[p + "attn.proj.bias"] = normal(vh)
        w[p + "mlp.fc1.weight"] = normal(vf, vh)
        w[p + "mlp.fc1.bias"] = normal(vf)
        w[p + "mlp.fc2.weight"] = normal(vh, vf)
        w[p + "mlp.fc2.bias"] = normal(vh)
        for n in ("norm1", "norm2"):
            w[p + n + ".weight"] = ones(vh)
            w[p + n + ".bias"] = zeros(vh)
        w[p + "ls1"] = np.full(vh, 0.5, dtype)
        w[p + "ls2"] = np.full(vh, 0.5, dtype)
    w["mlp1.0.weight"] = ones(vh * shuffle)
    w["mlp1.0.bias"] = zeros(vh * shuffle)
    w["mlp1.1.weight"] = normal(th, vh * shuffle)
    w["mlp1.1.bias"] = zeros(th)
    w["mlp1.3.weight"] = normal(th, th)
    w["mlp1.3.bias"] = zeros(th)
    lm = "language_model.model."
    w[lm + "embed_tokens.weight"] = normal(t["vocab_size"], th, scale=1.0)
    for i in range(TL):
        p = f"{lm}layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(heads * hd, th)
        w[p + "self_attn.q_proj.bias"] = normal(heads * hd)
        w[p + "self_attn.k_proj.weight"] = normal(kv * hd, th)
        w[p + "self_attn.k_proj.bias"] = normal(kv * hd)
        w[p + "self_attn.v_proj.weight"] = normal(kv * hd, th)
        w[p + "self_attn.v_proj.bias"] = normal(kv * hd)
        w[p + "self_attn.o_proj.weight"] = normal(th, heads * hd)
        w[p + "mlp.gate_proj.weight"] = normal(tf, th)
        w[p + "mlp.up_proj.weight"] = normal(tf, th)
        w[p + "mlp.down_proj.weight"] = normal(th, tf)
        w[p + "input_layernorm.weight"] = ones(th)
        w[p + "post_attention_layernorm.weight"] = ones(th)
    w[lm + "norm.weight"] = ones(th)
    if not t.get("tie_word_embeddings", False):
        w["language_model.lm_head.weight"] = normal(t["vocab_size"], th, scale=0.05)
    return w


def write_checkpoint(out_dir: Path, config: dict, weights: dict, tokenizer, dtype=None) -> Path:
    """Write config.json, model.safetensors (numpy or mx arrays, cast to `dtype` if given,
    e.g. mx.bfloat16 as the hub checkpoints are),
    generation_config.json and the tokenizer files, as a Hugging Face InternVL repo has them.

    `tokenizer` is a transformers tokenizer; its `<IMG_CONTEXT>` id and eos ids are recorded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = json.loads(json.dumps(config))
    llm = config["llm_config"]
    if llm.get("eos_token_id") is None:
        llm["eos_token_id"] = eos
    if llm.get("bos_token_id") is None:
        llm["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    arrays = {k: v if isinstance(v, mx.array) else mx.array(np.ascontiguousarray(v))
              for k, v in weights.items()}
    if dtype is not None:
        arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16",
                             mx.bfloat16: "bfloat16"}[next(iter(arrays.values())).dtype]
    mx.save_safetensors(str(out_dir / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [eos], "max_new_tokens": 256}, indent=2)
    )
    return out_dir


_CORPUS = """The quick brown fox jumps over the lazy dog.
A red circle is left of a blue square. How many triangles are in the picture? There are three.
What colour is the shape on the right? The shape on the right is green.
Describe the image. The image shows a small yellow star above a large purple rectangle.
Is there text in the image? Yes, the text says hello world.
Question: which object is bigger? Answer: the square is bigger than the circle.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 twenty thirty one hundred.
You are a helpful assistant. Please answer the question with one word.
"""


def train_tokenizer(corpus: str = _CORPUS, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained here, with InternVL's special tokens (ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TURN,
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
    )


def build_tiny_checkpoint(out_dir: Path, seed: int = 0, dtype=np.float32) -> Path:
    """A complete tiny InternVL2-layout Hugging Face checkpoint with random weights."""
    tokenizer = train_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer))
    return write_checkpoint(out_dir, config, random_weights(config, seed, dtype), tokenizer)
