"""What a default recipe costs: FLOPs per stage, and the hours they take at an ASSUMED Mac rate.

No Mac is reachable from here, so the time is a projection: matmul FLOPs (2 x parameters
per token forward, plus 4 x n^2 x width per attention layer) of each stage as the recipe
sets it, on two reference workloads - photo conversations (a 640x480 photo: 6 tiles + the
thumbnail = 7 tiles, 1792 image tokens, ~1.95k tokens a sample; the training tile cap of
model/internvl.py) and text conversations of 512 tokens - divided by a sustained fp32 rate
(3 TFLOP/s for a base M-series laptop GPU, 10 for a Max-class one: both ASSUMED). What it
leaves out: the fake quantizer's per-step cost (about 2 s on this CPU, independent of
tokens; benchmarks/qat_step.py), held-out scoring and the GPTQ start's rounding (numpy on
the CPU). With `teacher = "cached"` the teacher runs once per training sample (an ASSUMED
1000 samples here), with `live` once per sample of every step.

Model shapes are those of the registered checkpoints' Hugging Face config.json files
(InternViT-300M-448px with Qwen2-0.5B / Qwen2.5-0.5B / Qwen2.5-1.5B).

    python -m benchmarks.recipe_cost     # instant; writes results/recipe_cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speedq_mlx.model import registry
from speedq_mlx.quant.recipe import load_recipe

from .curve import lm_matmul_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VIT_300M = {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096,
            "image_size": 448, "patch_size": 14}
QWEN_05B = {"num_hidden_layers": 24, "hidden_size": 896, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_key_value_heads": 2}
QWEN_15B = {"num_hidden_layers": 28, "hidden_size": 1536, "intermediate_size": 8960,
            "num_attention_heads": 12, "num_key_value_heads": 2}
SHAPES = {
    "internvl2-1b": {"vision_config": VIT_300M, "llm_config": {**QWEN_05B, "vocab_size": 151655}},
    "internvl2.5-1b": {"vision_config": VIT_300M, "llm_config": {**QWEN_05B, "vocab_size": 151674}},
    "internvl3-1b": {"vision_config": VIT_300M, "llm_config": {**QWEN_05B, "vocab_size": 151674}},
    "internvl3-2b": {"vision_config": VIT_300M, "llm_config": {**QWEN_15B, "vocab_size": 151674}},
}
# samples: the training set the cached teacher's top-k pass runs over (ASSUMED: 1000)
WORKLOADS = {"photo": {"tiles": 7, "tokens": 1952, "samples": 1000},
             "text": {"tiles": 0, "tokens": 512, "samples": 1000}}
CALIBRATION_IMAGE_SAMPLES = 8  # data.sources.calibration_batches adds one batch of these
RATES = (3.0, 10.0)  # ASSUMED sustained fp32 TFLOP/s


def vit_block_params(vision: dict) -> int:
    """Matmul weights of one ViT block: qkv, proj, fc1, fc2."""
    h, inter = vision["hidden_size"], vision["intermediate_size"]
    return 4 * h * h + 2 * h * inter


def vit_tokens(vision: dict) -> int:
    """Tokens per tile: the patches and the class token."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def vit_forward(vision: dict, tiles: int, blocks: int | None = None) -> float:
    """FLOPs of the vision tower (or `blocks` of its blocks) on `tiles` tiles."""
    n, layers = vit_tokens(vision), blocks or vision["num_hidden_layers"]
    per_block = 2 * vit_block_params(vision) * n + 4 * n * n * vision["hidden_size"]
    return tiles * layers * per_block


def lm_forward(llm: dict, tokens: int) -> float:
    """FLOPs of the language model (decoder and head) on one sequence of `tokens`."""
    attention = 4 * llm["num_hidden_layers"] * tokens * tokens * llm["hidden_size"]
    return 2 * lm_matmul_params(llm) * tokens + attention


def stage_flops(shapes: dict, recipe: dict, workload: dict) -> dict:
    """FLOPs of each stage of `recipe` on `workload` samples (see the module docstring)."""
    vision, llm = shapes["vision_config"], shapes["llm_config"]
    tiles, tokens = workload["tiles"], workload["tokens"]
    out = {}
    s1 = recipe.get("stage1")
    if s1:
        calib_tiles = min(s1.get("images", 64) * 7, s1.get("max_tiles", 256))
        trained = s1.get("iters", 200) * s1.get("batch", 8) * 3 * vit_forward(vision, 1, 1)
        out["stage1"] = vision["num_hidden_layers"] * trained + 3 * vit_forward(vision, calib_tiles)
    s2 = recipe.get("stage2")
    if s2:  # frozen quantized tower forward; language model forward + activation backward
        passes = 2 + bool(s2.get("grad_checkpoint", False))
        out["stage2"] = s2["steps"] * s2["batch"] * (vit_forward(vision, tiles) + passes * lm_forward(llm, tokens))
    s3 = recipe.get("stage3")
    if s3:
        windows, length = s3.get("clip_windows", 128), s3.get("clip_tokens", 512)
        image_calib = CALIBRATION_IMAGE_SAMPLES * (vit_forward(vision, 7) + lm_forward(llm, 1952))
        out["stage3_start"] = windows * lm_forward(llm, length) + (image_calib if tiles else 0.0)
        passes = 3 + bool(s3.get("grad_checkpoint", False))  # student forward, backward (x2), recompute
        teacher = vit_forward(vision, tiles) + lm_forward(llm, tokens)
        student = vit_forward(vision, tiles) + passes * lm_forward(llm, tokens)
        if s3.get("teacher", "live") == "cached":  # one teacher pass over the training samples
            out["teacher_pass"] = workload["samples"] * teacher
            teacher = 0.0
        out["stage3_qat"] = s3["steps"] * s3["batch"] * (student + teacher)
    return out


def recipe_cost(name: str, bits: int, shapes: dict) -> dict:
    path = registry.recipes_dir() / f"{name}-w{bits}.toml"
    recipe = load_recipe(path)
    row = {"model": name, "bits": bits, "recipe": path.name,
           "stage3_steps": recipe["stage3"]["steps"], "stage3_batch": recipe["stage3"]["batch"]}
    for wname, workload in WORKLOADS.items():
        flops = stage_flops(shapes, recipe, workload)
        total = sum(flops.values())
        row[wname] = {"pflop": {k: round(v / 1e15, 2) for k, v in flops.items()},
                      "total_pflop": round(total / 1e15, 2),
                      "hours": {f"{r:g}_tflops": round(total / (r * 1e12) / 3600, 2) for r in RATES}}
    return row


def markdown(rows: list) -> str:
    rates = " | ".join(f"h at {r:g} TFLOP/s" for r in RATES)
    lines = [f"| recipe | data | stage 1 | stage 2 | start | teacher pass | stage 3 QAT | total PFLOP | {rates} |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(RATES)]
    for r in rows:
        for w in WORKLOADS:
            p = r[w]["pflop"]
            hours = " | ".join(f"{v:.2f}" for v in r[w]["hours"].values())
            lines.append(f"| {r['recipe']} | {w} | {p.get('stage1', 0):.2f} | {p.get('stage2', 0):.2f} | "
                         f"{p.get('stage3_start', 0):.2f} | {p.get('teacher_pass', 0):.2f} | {p.get('stage3_qat', 0):.2f} | "
                         f"{r[w]['total_pflop']:.2f} | {hours} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=RESULTS / "recipe_cost.json")
    args = ap.parse_args()
    rows = [recipe_cost(name, bits, SHAPES[name]) for name in registry.MODELS for bits in (2, 4)]
    table = markdown(rows)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"workloads": WORKLOADS, "assumed_tflops": RATES, "rows": rows}, indent=1))
    args.json.with_suffix(".md").write_text(table)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
