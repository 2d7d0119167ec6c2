"""The MLX Swift side of the artifact: what swift/ (package SpeedQVLM, InternVL for MLXVLM) needs.

No Swift toolchain runs here (the Swift code is compiled and tested on a Mac, see
swift/README.md). These tests hold the Python side to the contract both sides share:
swift/Sources/SpeedQVLM/parameter_paths.json, the one list of parameter paths the Swift model
declares, with the rule that expands it for N layers and the Swift sanitize rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from speedq_mlx.pipeline import QuantizeArgs, quantize
from speedq_mlx.model.io import safetensors_header

ROOT = Path(__file__).resolve().parents[2]
SWIFT = ROOT / "swift"
PATHS_FILE = SWIFT / "Sources" / "SpeedQVLM" / "parameter_paths.json"
REFERENCE_FILE = SWIFT / "Tests" / "SpeedQVLMTests" / "reference_cases.json"
SWIFT_SOURCES = SWIFT / "Sources" / "SpeedQVLM"
MODEL_SWIFT = SWIFT_SOURCES / "InternVLChat.swift"

# tokenizer_class values swift-transformers (>= 1.1.4, what mlx-swift-lm 3.x builds with)
# maps to a tokenizer: TokenizerModel.knownTokenizers (a "Fast" suffix is dropped first).
SWIFT_TRANSFORMERS_TOKENIZERS = {
    "BertTokenizer", "CodeGenTokenizer", "CodeLlamaTokenizer", "CohereTokenizer",
    "DistilbertTokenizer", "DistilBertTokenizer", "FalconTokenizer", "GemmaTokenizer",
    "GPT2Tokenizer", "LlamaTokenizer", "RobertaTokenizer", "T5Tokenizer", "TokenizersBackend",
    "PreTrainedTokenizer", "Qwen2Tokenizer", "WhisperTokenizer", "XLMRobertaTokenizer",
}

MIXED_RECIPE = """
[quant]
bits = 2
group_size = 64

[quant.vision]
bits = 4
group_size = 32

[quant.projector]
bits = 8
group_size = 64

[quant.embeddings]
bits = 4
group_size = 32

[quant.lm_head]
bits = 6
group_size = 64

[quant.overrides]
"vision_model.encoder.layers.0.*" = "none"
"language_model.model.layers.1.mlp.down_proj" = { bits = 3, group_size = 32 }
"""


# ---------------------------------------------------------------- the contract's rules


def contract() -> dict:
    return json.loads(PATHS_FILE.read_text())


def config_value(config: dict, dotted: str, default=None):
    """config[dotted] ('llm_config' falls back to 'text_config', as in the Swift config)."""
    parts = dotted.split(".")
    if parts[0] == "llm_config" and "llm_config" not in config:
        parts[0] = "text_config"
    node = config
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def holds(when: dict | None, config: dict) -> bool:
    return when is None or config_value(config, when["key"], when["default"]) == when["equals"]


def expand(groups: list[dict], config: dict) -> set[str]:
    """parameter_paths.json "expansion.rule": placeholders per layer, groups by 'when'."""
    layers = {"{v}": config_value(config, "vision_config.num_hidden_layers"),
              "{t}": config_value(config, "llm_config.num_hidden_layers")}
    out = set()
    for group in groups:
        if not holds(group.get("when"), config):
            continue
        for path in group["paths"]:
            placeholder = next((p for p in layers if p in path), None)
            if placeholder is None:
                out.add(path)
            else:
                out.update(path.replace(placeholder, str(i)) for i in range(layers[placeholder]))
    return out


def swift_parameters(config: dict) -> set[str]:
    return expand(contract()["parameters"], config)


def swift_quantizable(config: dict) -> set[str]:
    return expand(contract()["quantizable_modules"]["groups"], config)


def swift_sanitize(keys, config: dict) -> set[str]:
    """The key-level effect of InternVLChat.sanitize(weights:) (parameter_paths.json "sanitize")."""
    out = set(keys)
    for rule in contract()["sanitize"]["rules"]:
        if not holds(rule.get("when"), config):
            continue
        if "drop_keys_containing" in rule:
            out = {k for k in out if rule["drop_keys_containing"] not in k}
        if "drop_keys_with_prefix" in rule:
            out = {k for k in out if not k.startswith(rule["drop_keys_with_prefix"])}
    return out


# ------------------------------------- mlx-swift's update(modules:), as quantize(model:) uses it

LEAF = "module"


def update_tree(paths) -> dict:
    """ModuleChildren.unflattened: numeric path components become lists with None holes."""
    tree: dict = {}
    for path in paths:
        node = tree
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = LEAF

    def lists(node):
        if node is LEAF:
            return LEAF
        if all(k.isdigit() for k in node):
            return [lists(node[str(i)]) if str(i) in node else None
                    for i in range(max(int(k) for k in node) + 1)]
        return {k: lists(v) for k, v in node.items()}

    return lists(tree)


def swift_update_problems(node, path="", list_lengths=None) -> list[str]:
    """Where MLXNN's Module.update(modules:verify:) throws on this update tree: a list update
    must start with an update (else unexpectedStructure); a list of layer updates must update
    every layer it reaches (else mismatchedContainers); a list of leaf modules is replaced by
    as many modules as the update has (a short one truncates it)."""
    list_lengths = list_lengths or {}
    problems = []
    if isinstance(node, dict):
        for key, child in node.items():
            problems += swift_update_problems(child, f"{path}.{key}".lstrip("."), list_lengths)
    elif isinstance(node, list):
        first = node[0]
        if first is LEAF:
            if len(node) < list_lengths.get(path, 0):
                problems.append(f"{path}: update of {len(node)} entries truncates the list")
        elif isinstance(first, dict):
            for i, child in enumerate(node):
                if isinstance(child, dict):
                    problems += swift_update_problems(child, f"{path}.{i}", list_lengths)
                else:
                    problems.append(f"{path}.{i}: mismatchedContainers")
        else:
            problems.append(f"{path}: unexpectedStructure (entry 0 is not updated)")
    return problems


def speedq_fill(tree: dict, mlp1_length: int) -> dict:
    """InternVLChat.update(modules:verify:...) in Swift: fill the gaps before MLXNN sees them."""

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            entries = [fill(v) for v in node]
            if any(isinstance(e, dict) for e in entries):
                entries = [{} if e is None else e for e in entries]
            return entries
        return node

    out = {k: fill(v) for k, v in tree.items()}
    if isinstance(out.get("mlp1"), list):
        items = out["mlp1"] + [None] * (mlp1_length - len(out["mlp1"]))
        out["mlp1"] = [LEAF if e is None else e for e in items]
    return out


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=["recipe", "budget"])
def artifact(request, tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with mixed precision: vision 4-bit g32 (layer 0 kept float),
    projector 8-bit, language 2-bit g64 with one 3-bit g32 module, embeddings 4-bit g32,
    lm_head 6-bit g64; or ("budget") the same recipe under --target-size, which keeps the
    overrides and the (imageless) vision tower and projector as they are and chooses every
    other module's bits and group by sensitivity."""
    from devkit.testing import ENGLISH_TEXT

    tmp = tmp_path_factory.mktemp("swift-contract")
    recipe = tmp / "mixed.toml"
    recipe.write_text(MIXED_RECIPE)
    extra = {}
    if request.param == "budget":
        (tmp / "calib.txt").write_text("\n\n".join([ENGLISH_TEXT] * 8))
        extra = {"target_size": "1.0MB", "text": tmp / "calib.txt", "sensitivity_tokens": 64}
    out = quantize(QuantizeArgs(method="rtn", model=str(tiny_ckpt), output=tmp / "art", bits=2, recipe=recipe,
                                **extra), log=lambda *a: None)
    if request.param == "budget":
        plan = json.loads((tmp / "runs" / "art" / "plan.json").read_text())["modules"]
        assert len({(m["bits"], m["group_size"]) for m in plan.values() if not m["fixed"]}) >= 3
    return Path(out)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _header(folder: Path) -> dict:
    header = {}
    for f in sorted(folder.glob("*.safetensors")):
        header.update(safetensors_header(f))
    return header


def _quantized_modules(header: dict) -> set[str]:
    return {k[: -len(".scales")] for k in header if k.endswith(".scales")}


# ------------------------------------------------------------------ (a) parameter paths


def test_artifact_keys_are_the_swift_parameter_paths(artifact):
    config, header = _config(artifact), _header(artifact)
    quantized = _quantized_modules(header)
    expected = swift_parameters(config) | {f"{m}.{leaf}" for m in quantized
                                           for leaf in ("scales", "biases")}
    got = swift_sanitize(header, config)
    assert not got - expected, f"artifact keys the Swift model does not declare: {sorted(got - expected)}"
    assert not expected - got, f"Swift parameters the artifact lacks: {sorted(expected - got)}"
    # only Linear / Embedding modules can be quantized in Swift
    assert quantized <= swift_quantizable(config), sorted(quantized - swift_quantizable(config))
    # the recipe really is mixed: a float vision layer and float vision weights remain
    assert "vision_model.encoder.layers.0.attn.qkv" not in quantized
    assert "vision_model.encoder.layers.1.attn.qkv" in quantized


def test_conv_weight_is_already_mlx_layout(artifact):
    """Swift's sanitize leaves a weight in MLX layout [O, kH, kW, I] as it is."""
    config = _config(artifact)
    shape = _header(artifact)["vision_model.embeddings.patch_embedding.weight"]["shape"]
    patch = config["vision_config"]["patch_size"]
    assert shape == [config["vision_config"]["hidden_size"], patch, patch, 3]


def test_parameter_paths_mirror_mlx_vlm(tiny_ckpt):
    """The list is mlx-vlm's internvl_chat parameter tree: for the tiny checkpoint and for a
    config that turns on every optional group (and off the default ones)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_vlm.models.internvl_chat import config as vlm_config
    from mlx_vlm.models.internvl_chat.internvl_chat import Model

    base = _config(tiny_ckpt)
    variant = json.loads(json.dumps(base))
    variant["vision_config"].update(qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
    variant["llm_config"].update(tie_word_embeddings=True, attention_bias=False)
    for config in (base, variant):
        model = Model(vlm_config.ModelConfig(
            text_config=vlm_config.TextConfig.from_dict(config["llm_config"]),
            vision_config=vlm_config.VisionConfig.from_dict(config["vision_config"]),
            model_type="internvl_chat", downsample_ratio=config["downsample_ratio"]))
        params = {k for k, _ in tree_flatten(model.parameters())}
        assert params == swift_parameters(config), sorted(params ^ swift_parameters(config))
        linears = {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        assert linears == swift_quantizable(config), sorted(linears ^ swift_quantizable(config))


# -------------------------------------------------------------- (b) quantization entries


def test_quantization_entries_match_packed_shapes(artifact, tiny_ckpt):
    config, header = _config(artifact), _header(artifact)
    block = config["quantization"]
    source = safetensors_header(tiny_ckpt / "model.safetensors")
    global_setting = (block["bits"], block["group_size"])
    assert block.get("mode", "affine") == "affine"
    quantized = _quantized_modules(header)
    entries = {k: v for k, v in block.items() if k not in ("group_size", "bits", "mode")}

    used_entry = used_global = 0
    for module in sorted(quantized):
        entry = entries.get(module)
        assert entry is not False, f"{module} has scales but its entry says float"
        if isinstance(entry, dict):
            assert set(entry) <= {"group_size", "bits", "mode"}, entry
            assert entry.get("mode", "affine") == "affine", entry
            setting = (entry["bits"], entry["group_size"])
            used_entry += 1
        else:
            setting = global_setting
            used_global += 1
        in_dim = source[f"{module}.weight"]["shape"][-1]
        weight, scales, biases = (header[f"{module}.{leaf}"] for leaf in ("weight", "scales", "biases"))
        assert weight["dtype"] == "U32", module
        words, groups = weight["shape"][-1], scales["shape"][-1]
        assert words * 32 % in_dim == 0 and in_dim % groups == 0, module
        implied = (words * 32 // in_dim, in_dim // groups)
        assert implied == setting, f"{module}: packed shapes say {implied}, config says {setting}"
        assert biases["shape"] == scales["shape"], module
    # per-module entries name quantized modules only (Swift never reads a stale one, but a
    # stale entry means the writer and the weights disagree)
    assert set(entries) <= quantized, sorted(set(entries) - quantized)
    assert used_entry and used_global  # the artifact exercises both paths


def test_swift_quantize_update_applies_to_the_artifact(artifact):
    """quantize(model:) swaps the modules with update(modules:). MLXNN alone would throw on this
    artifact (mlp1.0 is never quantized; vision layer 0 is all float): SpeedQVLM's
    InternVLChat.update(modules:...) fills those gaps, and then nothing is left to throw on."""
    tree = update_tree(_quantized_modules(_header(artifact)))
    lengths = {"mlp1": 4}
    raw = swift_update_problems(tree, list_lengths=lengths)
    assert any(p.startswith("mlp1:") for p in raw), raw
    assert any(p.startswith("vision_model.encoder.layers") for p in raw), raw
    assert swift_update_problems(speedq_fill(tree, mlp1_length=4), list_lengths=lengths) == []
    source = MODEL_SWIFT.read_text()
    assert "public override func update(" in source and "fillingListGaps" in source


# ------------------------------------------------------------ (c) files MLX Swift needs


def test_files_mlx_swift_needs(artifact):
    config = _config(artifact)
    assert config["model_type"] == "internvl_chat"
    assert f'"{config["model_type"]}"' in (SWIFT_SOURCES / "Registration.swift").read_text()
    assert list(artifact.glob("model*.safetensors"))  # VLMModelFactory's weight-file names

    assert (artifact / "tokenizer.json").is_file()
    tok_config = json.loads((artifact / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"].replace("Fast", "") in SWIFT_TRANSFORMERS_TOKENIZERS
    assert tok_config.get("chat_template") or (artifact / "chat_template.jinja").is_file()

    # MLXVLM reads preprocessor_config.json when present, else processor_config.json
    preferred = next(artifact / n for n in ("preprocessor_config.json", "processor_config.json")
                     if (artifact / n).is_file())
    processor = json.loads(preferred.read_text())
    assert processor["processor_class"] == "InternVLChatProcessor"
    assert f'"{processor["processor_class"]}"' in (SWIFT_SOURCES / "Registration.swift").read_text()
    vision = config["vision_config"]
    size = config.get("force_image_size") or vision["image_size"]
    assert processor["size"] == size
    assert processor["num_image_token"] == (size // vision["patch_size"]) ** 2 * config["downsample_ratio"] ** 2
    assert processor["dynamic_max_num"] == config["max_dynamic_patch"]
    assert processor["dynamic_min_num"] == config["min_dynamic_patch"]
    assert processor["use_thumbnail"] == config["use_thumbnail"]
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert processor["image_std"] == [0.229, 0.224, 0.225]

    gen = json.loads((artifact / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"]


def test_prompt_tokens_the_swift_processor_uses(artifact):
    """The Swift processor renders [{"role": "user", "content": "<image>\\n..."}] with the
    artifact's template, then swaps each <image> for <img><IMG_CONTEXT>*N</img>."""
    from transformers import AutoTokenizer

    from speedq_mlx.model.chat_template import render

    config = _config(artifact)
    tok = AutoTokenizer.from_pretrained(str(artifact))
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render(config["template"], messages)
    assert text.count("<image>") == 1
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    assert None not in ids.values() and tok.unk_token_id not in ids.values()
    assert ids["<IMG_CONTEXT>"] == config["image_token_index"]
    # decode(encode(x)) is x, which the Swift processor's render-by-decoding relies on
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(encoded, skip_special_tokens=False) == text


# ------------------------------------------------------- static checks of the Swift sources


def test_swift_sources_declare_every_path_component():
    keys = set()
    for source in SWIFT_SOURCES.glob("*.swift"):
        keys |= set(re.findall(r'@(?:ModuleInfo|ParameterInfo)\(key:\s*"([^"]+)"\)', source.read_text()))
    doc = contract()
    paths = [p for g in doc["parameters"] for p in g["paths"]]
    paths += [p for g in doc["quantizable_modules"]["groups"] for p in g["paths"]]
    mlxnn_leaves = {"weight", "bias"}  # parameters of MLXNN's own layers
    components = {c for p in paths for c in p.split(".")
                  if not c.isdigit() and c not in ("{v}", "{t}")}
    assert components - mlxnn_leaves <= keys, sorted(components - mlxnn_leaves - keys)
    assert keys <= components, f"Swift keys not in parameter_paths.json: {sorted(keys - components)}"
    source = MODEL_SWIFT.read_text()
    for rule in doc["sanitize"]["rules"]:
        for field in ("drop_keys_containing", "drop_keys_with_prefix"):
            if field in rule:
                assert f'"{rule[field]}"' in source, rule["id"]
        assert rule["id"] in source, rule["id"]
    # the Swift tests read the same list
    swift_tests = (SWIFT / "Tests" / "SpeedQVLMTests" / "SpeedQVLMTests.swift").read_text()
    assert "Sources/SpeedQVLM/parameter_paths.json" in swift_tests


# ---------------------------------------------- reference values the Swift tests check against


def _mlx_vlm_grid(width, height, min_tiles, max_tiles, tile_size):
    from mlx_vlm.models.internvl_chat.processor import find_closest_aspect_ratio

    ratios = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
              for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(width / height, ratios, width, height, tile_size)


def _swift_grid(width, height, min_tiles, max_tiles, tile_size):
    """InternVLTiling.grid, transcribed: candidates in (i * j, i, j) order."""
    candidates = sorted(((i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
                         if min_tiles <= i * j <= max_tiles), key=lambda r: (r[0] * r[1], r))
    aspect, area, tile_area = width / height, width * height, tile_size * tile_size
    best_diff, best = float("inf"), (1, 1)
    for ratio in candidates:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff:
            if abs(area - tile_area * ratio[0] * ratio[1]) < abs(area - tile_area * best[0] * best[1]):
                best = ratio
    return best


def test_reference_cases_are_mlx_vlm_values():
    import mlx.core as mx
    from mlx_vlm.models.base import pixel_shuffle

    ref = json.loads(REFERENCE_FILE.read_text())
    for c in ref["tiling"]["cases"]:
        args = (c["width"], c["height"], c["min_tiles"], c["max_tiles"], c["tile_size"])
        assert _mlx_vlm_grid(*args) == (c["columns"], c["rows"]), c
    ps = ref["pixel_shuffle"]
    x = mx.arange(int(np.prod(ps["input_shape"]))).reshape(ps["input_shape"]).astype(mx.float32)
    y = pixel_shuffle(x, ps["ratio"])
    assert list(y.shape) == ps["output_shape"]
    assert [int(v) for v in y.flatten().tolist()] == ps["output"]


def test_swift_tile_order_picks_what_mlx_vlm_picks():
    """Python orders equal-product candidates by set iteration; Swift by (i, j). They agree."""
    sizes = range(20, 2400, 53)
    for max_tiles in (1, 6, 12):
        for w in sizes:
            for h in sizes:
                args = (w, h, 1, max_tiles, 448)
                assert _swift_grid(*args) == _mlx_vlm_grid(*args), args
