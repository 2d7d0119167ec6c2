"""Write a quantized model as a folder that stock mlx-vlm (and MLX Swift) load.

Everything is written into a temporary sibling folder that is renamed into place
only when complete, so a failed or interrupted export never leaves half an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import __version__
from .atomic import atomic_dir
from .chat_template import jinja_template
from .errors import SpeedQError
from .model_io import dtype_name, image_token_id
from .qlayers import _FakeQuant
from .report import artifact_report, format_report

WEIGHTS_FILE = "model.safetensors"


def artifact_weights(model: nn.Module, dtype) -> dict:
    """Flat weight dict: packed triples for fake-quantized modules, the rest cast to dtype."""
    from tqdm import tqdm

    quant = {p: m for p, m in model.named_modules() if isinstance(m, _FakeQuant)}
    out = {}
    for path, module in tqdm(sorted(quant.items()), desc="packing", unit="layer",
                             disable=len(quant) < 50, leave=False):
        for k, v in module.packed().items():
            out[f"{path}.{k}"] = v if v.dtype == mx.uint32 else v.astype(dtype)
    for key, value in tree_flatten(model.parameters()):
        if key.rsplit(".", 1)[0] in quant:
            continue
        out[key] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


def quantization_block(plan: dict, model: nn.Module) -> dict:
    """MLX's config "quantization": the most common setting as the global one, plus an
    entry for every quantized module that differs from it (or that mlx-vlm's loader
    would otherwise skip: weight size not a multiple of 64)."""
    used = [s for s in plan.values() if s is not None]
    if not used:
        return {}
    bits, group = max(set(used), key=used.count)
    block = {"group_size": group, "bits": bits, "mode": "affine"}
    modules = dict(model.named_modules())
    for path, setting in sorted(plan.items()):
        if setting is None:
            continue
        if setting != (bits, group) or modules[path].weight.size % 64 != 0:
            block[path] = {"group_size": setting[1], "bits": setting[0], "mode": "affine"}
    return block


def artifact_config(source_config: dict, plan: dict, model: nn.Module, tokenizer, dtype) -> dict:
    config = json.loads(json.dumps(source_config))
    config.pop("auto_map", None)  # the PyTorch remote code is not shipped
    config.pop("quantization_config", None)
    eos = eos_token_ids(tokenizer, config)
    config["image_token_index"] = image_token_id(tokenizer)
    config["eos_token_id"] = eos
    config["torch_dtype"] = dtype_name(dtype)
    llm = config.get("llm_config") or config.get("text_config")
    llm.setdefault("num_key_value_heads", llm["num_attention_heads"])
    llm["eos_token_id"] = eos
    block = quantization_block(plan, model)
    if block:
        config["quantization"] = block
        config["quantization_config"] = block
    return config


def eos_token_ids(tokenizer, config: dict) -> list[int]:
    """The turn separator of the chat template first, then the tokenizer's own eos."""
    ids = []
    for tok in ("<|im_end|>", tokenizer.eos_token, "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok else None
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(int(tid))
    if not ids:
        raise SpeedQError("tokenizer has no end-of-turn token (<|im_end|> or eos)")
    return ids


def processor_files(config: dict) -> dict:
    """processor_config.json / preprocessor_config.json contents (mlx-vlm and MLX Swift)."""
    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision["image_size"]
    patch = vision["patch_size"]
    ratio = config.get("downsample_ratio", 0.5)
    num_image_token = int((image_size // patch) ** 2 * ratio**2)
    processor = {"processor_class": "InternVLChatProcessor", "image_size": image_size,
                 "patch_size": patch, "downsample_ratio": ratio,
                 "num_image_token": num_image_token}
    preprocessor = {"processor_class": "InternVLChatProcessor",
                    "image_processor_type": "InternVLImageProcessor",
                    "size": image_size, "do_resize": True, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                    "dynamic_min_num": config.get("min_dynamic_patch", 1),
                    "dynamic_max_num": config.get("max_dynamic_patch", 12),
                    "use_thumbnail": config.get("use_thumbnail", True),
                    "num_image_token": num_image_token}
    return {"processor_config.json": processor, "preprocessor_config.json": preprocessor}


def write_artifact(out_dir: Path, model: nn.Module, plan: dict, source_config: dict,
                   tokenizer, dtype=mx.float16, card_info: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write the artifact atomically: tmp folder, then rename over out_dir."""
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        config = artifact_config(source_config, plan, model, tokenizer, dtype)
        weights = artifact_weights(model, dtype)
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        template = config.get("template", "Hermes-2")
        tokenizer.chat_template = jinja_template(template)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        gen = {"eos_token_id": config["eos_token_id"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, content in processor_files(config).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        table = format_report(artifact_report(tmp))
        (tmp / "README.md").write_text(model_card(report_table=table, **(card_info or {})))
    return out_dir


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless overwrite; call before any work starts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SpeedQError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SpeedQError(f"output path {out_dir} exists and is not a folder")


def model_card(report_table: str, source: str = "?", method: str = "rtn",
               recipe_path: str = "?", stages: str = "-", eval_table: str | None = None,
               eval_notes: str = "") -> str:
    evaluation = f"\n## Evaluation\n{eval_notes}\n\n{eval_table}\n" if eval_table else ""
    return f"""---
library_name: mlx
tags: [mlx, mlx-vlm, internvl, quantized, speedq-mlx]
base_model: {source}
---
# {Path(str(source)).name} - {method.upper()} quantized for MLX

Made with speedq-mlx {__version__} from `{source}`.

- Method: `{method}` (SPEED-Q stages run: {stages})
- Recipe: `{Path(recipe_path).name}`

## What is in it
```
{report_table}
```
{evaluation}
## Use
```bash
python -m mlx_vlm.generate --model <this folder> --image photo.jpg --prompt "Describe the image." --max-tokens 100
speedq-mlx chat <this folder> --image photo.jpg   # InternVL's own chat template (ChatML)
```
Note: `mlx_vlm.generate` / `mlx_vlm.chat` render internvl_chat prompts with mlx-vlm's generic
"User: ... Assistant:" template; `speedq-mlx chat` uses the model's trained template, which
this folder also carries in `chat_template.jinja` and `tokenizer_config.json`.
"""
