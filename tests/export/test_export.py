"""Export parity: the folder mlx_vlm.load reads computes what the in-memory fake-quantized model did."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from speedq_mlx.model import io as model_io
from speedq_mlx.model.internvl import image_token_id
from speedq_mlx.export.artifact import write_artifact
from speedq_mlx.quant.plan import apply_plan, build_plan
from speedq_mlx.quant.recipe import component_settings, load_recipe
from speedq_mlx.model.registry import default_recipe
from speedq_mlx.stages.common import StageConfig

from devkit.testing import run_cli


def _fake_quant_model(ckpt, settings, recipe_overrides=None, scale_dtype=None):
    tok = model_io.load_tokenizer(ckpt)
    model = model_io.load_model(ckpt, mx.float32, image_token_id(tok))
    plan = build_plan(model, settings, recipe_overrides)
    apply_plan(model, plan, scale_dtype=scale_dtype)
    return model, plan, tok


def _inputs(processor, image_path, question="What shape is it?"):
    from mlx_vlm.utils import prepare_inputs

    prompt = "<|im_start|>user\n<image>\n" + question + "<|im_end|><|im_start|>assistant\n"
    inputs = prepare_inputs(processor, images=[str(image_path)], prompts=[prompt])
    return inputs["input_ids"], inputs["pixel_values"]


def _logits(model, ids, pixels):
    out = model(ids, pixels, mask=None)
    return np.array(getattr(out, "logits", out).astype(mx.float32))


@pytest.mark.parametrize("settings", [
    {"vision": (2, 64), "projector": (2, 64), "language": (2, 64), "embeddings": (4, 32), "lm_head": (4, 32)},
    {"vision": (4, 32), "projector": (4, 64), "language": (2, 64), "embeddings": (4, 32), "lm_head": (4, 32)},
], ids=["w2", "mixed-vision4g32-language2g64"])
def test_exported_logits_match_in_memory_model(tiny_ckpt, image_path, tmp_path, settings):
    from mlx_vlm import load

    model, plan, tok = _fake_quant_model(tiny_ckpt, settings)
    out = write_artifact(tmp_path / "art", model, plan, model_io.read_config(tiny_ckpt), tok,
                         dtype=mx.float32)
    loaded, processor = load(str(out))
    ids, pixels = _inputs(processor, image_path)
    assert int((ids == image_token_id(tok)).sum()) > 0
    ref, got = _logits(model, ids, pixels), _logits(loaded, ids, pixels)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-4 * scale
    # every module came back quantized with exactly its planned bits / group size
    modules = dict(loaded.named_modules())
    for path, setting in plan.items():
        m = modules[path]
        assert isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)), path
        assert (m.bits, m.group_size) == setting, path
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == image_token_id(tok)
    assert config["eos_token_id"][0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_float16_artifact_generates(tiny_ckpt, image_path, tmp_path, capsys):
    from mlx_vlm import generate, load

    code, out, err = run_cli(["quantize", "--method", "rtn", "--model", tiny_ckpt, "--bits", "2", "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    model, processor = load(str(tmp_path / "a"))
    assert model.language_model.model.embed_tokens.scales.dtype == mx.float16
    result = generate(model, processor, "Describe the image.", image=[str(image_path)],
                      max_tokens=6, temperature=0.0)
    assert result.generation_tokens > 0


def test_artifact_files_and_model_card(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "-b", "4", "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja", "processor_config.json",
            "preprocessor_config.json", "README.md"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Method: `rtn`" in card and "4-bit g64" in card and "embeddings" in card


def test_inspect_reports_bits_per_weight(tiny_ckpt, tmp_path, capsys):
    assert run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "-b", "2", "-o", tmp_path / "a"], capsys)[0] == 0
    code, out, _ = run_cli(["inspect", tmp_path / "a", "--json"], capsys)
    assert code == 0
    rep = {r["component"]: r for r in json.loads(out)["components"]}
    # 4-bit g32 with fp16 scale + bias = 4 + 32/32 = 5 bits per weight, exactly
    assert rep["embeddings"]["settings"] == "4-bit g32"
    assert rep["embeddings"]["bits_per_weight"] == pytest.approx(5.0)
    assert rep["language"]["settings"] == "2-bit g64"
    assert 2.5 <= rep["language"]["bits_per_weight"] < 2.6  # 2 + 32/64, plus fp16 q/k/v biases
    code, table, _ = run_cli(["inspect", tmp_path / "a"], capsys)
    assert code == 0 and "size on disk" in table and "2-bit g64" in table


def test_registered_recipes_parse_and_select_by_bits():
    for name in ("internvl2-1b", "internvl2.5-1b", "internvl3-1b", "internvl3-2b"):
        for bits in (2, 4):
            path = default_recipe(name, bits)
            assert path.name == f"{name}-w{bits}.toml"
            recipe = load_recipe(path)
            s = component_settings(recipe)
            assert s["language"] == (bits, 64) and s["embeddings"] == (4, 32)
            stage2, stage3 = (StageConfig.from_recipe(recipe, n) for n in ("stage2", "stage3"))
            # the settings benchmarks/memory.py measured under 16 GB (a whole run, photo samples)
            assert stage3.teacher == "cached" and stage2.train.micro_batch == stage3.train.micro_batch == 1
            assert stage2.grad_checkpoint and stage3.grad_checkpoint
    assert default_recipe("internvl2-1b", 3).name == "default.toml"


def test_recipe_overrides_keep_modules_float(tiny_ckpt, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quant]\nbits = 4\ngroup_size = 64\n[quant.projector]\nbits = "none"\n'
                      '[quant.overrides]\n"vision_model.encoder.layers.0.*" = "none"\n'
                      '"language_model.model.layers.1.mlp.down_proj" = { bits = 8, group_size = 128 }\n')
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "--recipe", recipe, "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    q = json.loads((tmp_path / "a" / "config.json").read_text())["quantization"]
    assert q["language_model.model.layers.1.mlp.down_proj"] == {"group_size": 128, "bits": 8, "mode": "affine"}
    from mlx_vlm import load

    model, _ = load(str(tmp_path / "a"))
    mods = dict(model.named_modules())
    assert type(mods["mlp1.1"]) is nn.Linear
    assert type(mods["vision_model.encoder.layers.0.attn.qkv"]) is nn.Linear
    assert isinstance(mods["vision_model.encoder.layers.1.attn.qkv"], nn.QuantizedLinear)
    assert mods["language_model.model.layers.1.mlp.down_proj"].bits == 8
