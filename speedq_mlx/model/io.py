"""Find a checkpoint (local folder, Hugging Face repo id, or registered short name)
and load it with mlx-vlm's own InternVL model classes, in a chosen compute dtype."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import SpeedQError, one_line
from . import internvl, registry

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16,
          "fp16": mx.float16, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def parse_dtype(name: str):
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SpeedQError(f"unknown dtype {name!r} (choose float32, float16 or bfloat16)") from None


def dtype_name(dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def resolve_source(model: str) -> tuple[Path, str | None]:
    """(local folder, registered short name or None) for a name, repo id or path."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, None
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.rstrip("/").split("/", 1)[-1]
    if "/" not in model:
        name = model.lower()
        if name in registry.LOCAL_MODELS:
            return registry.local_model(name), name
        return download(registry.hub_id(name)), name
    if looks_like_path or path.exists() or model.count("/") != 1:
        raise SpeedQError(f"model folder not found: {model}")
    return download(model), None


def download(repo_id: str) -> Path:
    """snapshot_download (honours HF_HUB_OFFLINE and the local cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all one-line errors for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if offline else ""
        raise SpeedQError(f"cannot get {repo_id} from the Hugging Face hub{hint}: {one_line(e)}") from None


def read_config(path: Path) -> dict:
    """config.json of an InternVL (internvl_chat) checkpoint, checked for what we support."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise SpeedQError(f"{path} has no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SpeedQError(f"cannot parse {cfg_file}: {e}") from None
    if config.get("model_type") != internvl.MODEL_TYPE:
        raise SpeedQError(f"{path}: model_type is {config.get('model_type')!r}; "
                          "speedq-mlx supports InternVL checkpoints (model_type internvl_chat)")
    llm_type = internvl.llm_config(config).get("model_type")
    if llm_type not in internvl.SUPPORTED_LLMS:
        raise SpeedQError(f"{path}: language model type {llm_type!r} is not supported by "
                          f"mlx-vlm's internvl_chat (supported: {', '.join(internvl.SUPPORTED_LLMS)})")
    if "quantization" in config:
        raise SpeedQError(f"{path} is already quantized; start from the full-precision checkpoint")
    if not list(Path(path).glob("*.safetensors")):
        raise SpeedQError(f"{path} has no *.safetensors weights")
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise SpeedQError(f"cannot load the tokenizer in {path}: {one_line(e)}") from None


def load_model(path: Path, dtype=mx.float32, image_token_index: int | None = None,
               artifact: bool = False) -> nn.Module:
    """mlx-vlm's internvl_chat Model with the folder's weights, computing in `dtype`.

    A source checkpoint is checked first (read_config); an artifact (quantized or exported
    by MLX) loads as mlx-vlm loads it, its quantized layers keeping their codes (only
    scales and biases are cast). HF InternVL configs have no top-level image_token_index
    and mlx-vlm's default (151667) is InternVL2.5's id; pass the tokenizer's <IMG_CONTEXT>.
    """
    from mlx_vlm.utils import load_model as vlm_load_model

    if not artifact:
        read_config(path)
    try:
        model = vlm_load_model(Path(path), lazy=True)
    except Exception as e:
        what = "load" if artifact else "load weights from"
        raise SpeedQError(f"cannot {what} {path}{' with mlx-vlm' if artifact else ''}: "
                          f"{one_line(e)}") from None
    model.set_dtype(dtype)
    if image_token_index is not None:
        model.config.image_token_index = image_token_index
    mx.eval(model.parameters())
    return model


def safetensors_header(path: Path, metadata: bool = False) -> dict:
    """Tensor name -> {dtype, shape, data_offsets}, read without loading any data
    (with metadata=True the file's "__metadata__" dict instead)."""
    import struct

    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpeedQError(f"{path} is not a readable safetensors file: {e}") from None
    meta = header.pop("__metadata__", None) or {}
    return meta if metadata else header


def is_mlx_folder(path: Path) -> bool:
    """Weights written by MLX (an exported folder, quantized or not), not a HF checkpoint."""
    files = sorted(Path(path).glob("*.safetensors"))
    return bool(files) and safetensors_header(files[0], metadata=True).get("format") == "mlx"


def checkpoint_header(path: Path) -> dict:
    """safetensors_header of every *.safetensors file of a folder, merged."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(safetensors_header(f))
    return out
