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

from ..errors import SpeedQError
from ..model import internvl
from ..model.chat_template import jinja_template
from ..model.io import dtype_name
from ..quant.layers import FakeQuant
from ..run import atomic_dir
from .card import write_card

WEIGHTS_FILE = "model.safetensors"


def artifact_weights(model: nn.Module, dtype) -> dict:
    """Flat weight dict: packed triples for fake-quantized modules, the rest cast to dtype."""
    from tqdm import tqdm

    quant = {p: m for p, m in model.named_modules() if isinstance(m, FakeQuant)}
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
        m = modules[path]
        rows, cols = m.weight_shape if isinstance(m, FakeQuant) else m.weight.shape
        if setting != (bits, group) or (rows * cols) % 64 != 0:
            block[path] = {"group_size": setting[1], "bits": setting[0], "mode": "affine"}
    return block


def artifact_config(source_config: dict, plan: dict, model: nn.Module, tokenizer, dtype) -> dict:
    config = json.loads(json.dumps(source_config))
    config.pop("auto_map", None)  # the PyTorch remote code is not shipped
    config.pop("quantization_config", None)
    eos = internvl.eos_token_ids(tokenizer)
    config["image_token_index"] = internvl.image_token_id(tokenizer)
    config["eos_token_id"] = eos
    config["torch_dtype"] = dtype_name(dtype)
    llm = internvl.llm_config(config)
    llm.setdefault("num_key_value_heads", llm["num_attention_heads"])
    llm["eos_token_id"] = eos
    block = quantization_block(plan, model)
    if block:
        config["quantization"] = block
        config["quantization_config"] = block
    return config


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
        write_support_files(tmp, config, tokenizer)
        write_card(tmp, card_info)
    return out_dir


def write_support_files(folder: Path, config: dict, tokenizer) -> None:
    """Everything but the weights and the model card: tokenizer, chat template, configs."""
    tokenizer.chat_template = jinja_template(internvl.template(config))
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    gen = {"eos_token_id": config["eos_token_id"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    for name, content in internvl.processor_files(config).items():
        (folder / name).write_text(json.dumps(content, indent=2))


def support_files_bytes(source_config: dict, tokenizer, dtype) -> int:
    """What write_support_files writes for an unquantized config (a size budget adds a
    bound for the quantization entries): written to a scratch folder and measured."""
    import tempfile

    config = artifact_config(source_config, {}, None, tokenizer, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        write_support_files(Path(tmp), config, tokenizer)
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless overwrite; call before any work starts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SpeedQError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SpeedQError(f"output path {out_dir} exists and is not a folder")
