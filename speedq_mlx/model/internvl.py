"""Every InternVL fact the project relies on, in one place.

Token strings, the default chat template, image size and tokens per tile, tiling limits,
the image normalisation, and how the end-of-turn, pad and `<IMG_CONTEXT>` ids are found
in a checkpoint's tokenizer. Values come from OpenGVLab's InternVL2/2.5/3 checkpoints
(config.json, conversation.py, the image transform) and mlx-vlm's internvl_chat model.
"""

from __future__ import annotations

from ..errors import SpeedQError

IMAGE = "<image>"  # placeholder in conversations, expanded to IMG_START + IMG_CONTEXT * n + IMG_END
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
END_OF_TURN = "<|im_end|>"  # ChatML turn separator: the eos of generation
# Special tokens InternVL adds to the language model's tokenizer, in id order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", END_OF_TURN, IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

DEFAULT_TEMPLATE = "Hermes-2"  # InternVL2's ChatML template (config.json "template")
SUPPORTED_LLMS = ("qwen2",)  # mlx-vlm's internvl_chat has a Qwen2-style decoder only
MODEL_TYPE = "internvl_chat"

IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation of InternVL's transform
IMAGE_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_TILES = 12  # max_dynamic_patch of InternVL2-1B (+ a thumbnail)
# Training (stages 2 and 3): InternVL's own fine-tuning caps dynamic tiles at 6 (+ thumbnail:
# at most 7 x 256 = 1792 image tokens), and 2560 tokens then leave ~700 for the text of a
# typical photo conversation.
TRAINING_MAX_TILES = 6
TRAINING_MAX_LENGTH = 2560


def training_tiles(config: dict, requested: int | None) -> int:
    """The tile cap of training samples: the user's, else min(6, the checkpoint's)."""
    return requested if requested is not None else min(TRAINING_MAX_TILES, tiling(config)["max"])


def llm_config(config: dict) -> dict:
    """The language model's config (InternVL calls it llm_config, transformers text_config)."""
    return config.get("llm_config") or config.get("text_config") or {}


def template(config: dict) -> str:
    return config.get("template", DEFAULT_TEMPLATE)


def image_size(config: dict) -> int:
    """Side of one square tile in pixels (448 for InternVL2-1B)."""
    return config.get("force_image_size") or config["vision_config"]["image_size"]


def patch_size(config: dict) -> int:
    return config["vision_config"].get("patch_size", 14)


def downsample_ratio(config: dict) -> float:
    return config.get("downsample_ratio", 0.5)


def tokens_per_tile(config: dict) -> int:
    """<IMG_CONTEXT> tokens per tile after pixel shuffle (256 for InternVL2-1B)."""
    return int((image_size(config) // patch_size(config)) ** 2 * downsample_ratio(config) ** 2)


def tiling(config: dict) -> dict:
    """Dynamic tiling settings of the checkpoint (min / max tiles, thumbnail)."""
    return {"min": config.get("min_dynamic_patch", 1),
            "max": config.get("max_dynamic_patch", DEFAULT_MAX_TILES),
            "thumbnail": config.get("use_thumbnail", True)}


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token`, or None when the tokenizer does not know it."""
    tid = tokenizer.convert_tokens_to_ids(token) if token else None
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def image_token_id(tokenizer) -> int:
    """Id of <IMG_CONTEXT>, the token the vision features replace."""
    tid = token_id(tokenizer, IMG_CONTEXT)
    if tid is None:
        raise SpeedQError("tokenizer has no <IMG_CONTEXT> token (not an InternVL tokenizer)")
    return tid


def eos_token_ids(tokenizer) -> list[int]:
    """The turn separator of the chat template first, then the tokenizer's own eos."""
    ids = []
    for tok in (END_OF_TURN, tokenizer.eos_token, "<|endoftext|>"):
        tid = token_id(tokenizer, tok)
        if tid is not None and tid not in ids:
            ids.append(tid)
    if not ids:
        raise SpeedQError("tokenizer has no end-of-turn token (<|im_end|> or eos)")
    return ids


def pad_token_id(tokenizer) -> int:
    """Padding of training batches: the tokenizer's pad token, else its eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def separator_token_id(tokenizer) -> int | None:
    """What joins documents in text windows: end-of-text (eos), else pad."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id


def processor_files(config: dict) -> dict:
    """processor_config.json / preprocessor_config.json of an artifact (mlx-vlm, MLX Swift)."""
    size, n_tok, tiles = image_size(config), tokens_per_tile(config), tiling(config)
    processor = {"processor_class": "InternVLChatProcessor", "image_size": size,
                 "patch_size": patch_size(config), "downsample_ratio": downsample_ratio(config),
                 "num_image_token": n_tok}
    preprocessor = {"processor_class": "InternVLChatProcessor",
                    "image_processor_type": "InternVLImageProcessor",
                    "size": size, "do_resize": True, "do_normalize": True,
                    "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
                    "dynamic_min_num": tiles["min"], "dynamic_max_num": tiles["max"],
                    "use_thumbnail": tiles["thumbnail"], "num_image_token": n_tok}
    return {"processor_config.json": processor, "preprocessor_config.json": preprocessor}
