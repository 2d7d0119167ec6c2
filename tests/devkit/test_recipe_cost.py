"""benchmarks.recipe_cost: FLOP counts against the parameters of a real model and the recipes."""

import mlx.core as mx
import mlx.nn as nn

from benchmarks import recipe_cost as RC
from speedq_mlx.model import io as model_io
from speedq_mlx.model.internvl import image_token_id


def _linear_weights(module) -> int:
    return sum(m.weight.size for _, m in module.named_modules() if isinstance(m, nn.Linear))


def test_matmul_counts_are_those_of_the_loaded_model(tiny_ckpt):
    config = model_io.read_config(tiny_ckpt)
    model = model_io.load_model(tiny_ckpt, mx.float32, image_token_id(model_io.load_tokenizer(tiny_ckpt)))
    vision = config["vision_config"]
    blocks = model.vision_model.encoder.layers
    assert RC.vit_block_params(vision) * len(blocks) == sum(_linear_weights(b) for b in blocks)
    patches = model.vision_model.embeddings.position_embedding.shape[1]  # patches + class token
    assert RC.vit_tokens(vision) == patches
    llm, lm = config["llm_config"], model.language_model
    decoder = sum(_linear_weights(layer) for layer in lm.model.layers)
    head = llm["vocab_size"] * llm["hidden_size"]  # tied or not, the head is a vocab x hidden matmul
    assert RC.lm_matmul_params(llm) == decoder + head


def test_stage3_flops_of_the_internvl2_1b_recipe_on_photos():
    """2000 steps x 4 photo samples: the student's ViT forward on 7 tiles and its language
    model's forward, backward (2x) and recomputed forward (grad_checkpoint = true) on 1952
    tokens; the cached teacher's ViT and language-model forward once per training sample."""
    row = RC.recipe_cost("internvl2-1b", 2, RC.SHAPES["internvl2-1b"])
    n, h = 1025, 1024
    vit = 7 * 24 * (2 * (4 * h * h + 2 * h * 4096) * n + 4 * n * n * h)
    params = 24 * (2 * 896**2 + 2 * 896 * 128 + 3 * 896 * 4864) + 151655 * 896
    lm = 2 * params * 1952 + 4 * 24 * 1952**2 * 896
    assert abs(row["photo"]["pflop"]["stage3_qat"] - 8000 * (vit + 4 * lm) / 1e15) < 0.01
    assert abs(row["photo"]["pflop"]["teacher_pass"] - 1000 * (vit + lm) / 1e15) < 0.01
    total = row["photo"]["total_pflop"] * 1e15
    assert abs(row["photo"]["hours"]["10_tflops"] - total / 10e12 / 3600) < 0.01
