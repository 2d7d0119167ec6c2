"""Stage 1 cost on the full-size InternViT-300M shape (random weights, fp32).

Runs stage 1 (block-wise AdaRound) on the first --blocks blocks of an InternViT-300M
(InternVL2-1B's vision tower: 24 blocks, hidden 1024, FFN 4096, 448px tiles = 1025
tokens) with a calibration set of --images tiles, for --iters steps per block, and
projects the time of the whole tower at the recipe's default steps. Prints a table
and writes JSON.

    python -m benchmarks.vision_stage --images 64 --iters 4 --blocks 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="calibration tiles (one 448px tile per image)")
    ap.add_argument("--iters", type=int, default=4, help="AdaRound steps measured per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks measured (of 24)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "vision_stage.json")
    args = ap.parse_args()

    from mlx_vlm.models.internvl_chat.config import VisionConfig
    from mlx_vlm.models.internvl_chat.vision import VisionModel

    from speedq_mlx.model.synthetic import internvl_config
    from speedq_mlx.quant.recipe import load_recipe
    from speedq_mlx.model.registry import default_recipe
    from speedq_mlx.run import Run, RunFolder
    from speedq_mlx.stages.stage1_vision import LINEARS, Stage1Config, run_stage1

    vcfg = VisionConfig.from_dict(internvl_config(vision={}, llm={})["vision_config"])
    full_blocks = vcfg.num_hidden_layers
    vcfg.num_hidden_layers = args.blocks
    vm = VisionModel(vcfg)
    mx.eval(vm.parameters())
    model = SimpleNamespace(vision_model=vm, config=SimpleNamespace(vision_config=vcfg))
    plan = {f"vision_model.encoder.layers.{i}.{d}": (args.bits, args.group_size)
            for i in range(args.blocks) for d in LINEARS.values()}
    pixels = mx.random.normal((args.images, vcfg.image_size, vcfg.image_size, 3), key=mx.random.key(0))
    cfg = Stage1Config(iters=args.iters, batch=args.batch, images=args.images, max_tiles=args.images)
    t_step = _time_steps(vcfg, cfg)
    mx.reset_peak_memory()
    run_dir = Path("/tmp") / f"speedq-bench-vision-{int(time.time())}"
    t0 = time.time()
    run = Run(source=Path("."), config={}, tokenizer=None, image_token=0, pad_id=0,
              folder=RunFolder(run_dir), log=lambda *a: None)
    report = run_stage1(run, model, plan, pixels, cfg)
    total = time.time() - t0

    # time of the fixed part (targets, RTN and init errors, final error) vs per step
    blocks = report["blocks"]
    per_block = [b["seconds"] for b in blocks]
    fixed = max(0.0, sum(per_block) / len(per_block) - t_step * args.iters)
    recipe = Stage1Config.from_recipe(load_recipe(default_recipe("internvl2-1b", args.bits)))
    projected_block = fixed + t_step * recipe.iters
    result = {
        "shape": "InternViT-300M (hidden 1024, FFN 4096, 1025 tokens/tile)",
        "bits": args.bits, "group_size": args.group_size, "tiles": args.images, "batch": args.batch,
        "iters_measured": args.iters, "blocks_measured": args.blocks,
        "seconds_per_block": per_block, "seconds_per_step": round(t_step, 3),
        "seconds_fixed_per_block": round(fixed, 2),
        "peak_mlx_memory_gib": round(mx.get_peak_memory() / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "recipe_iters": recipe.iters,
        "projected_seconds_per_block_at_recipe": round(projected_block, 1),
        "projected_hours_whole_tower_at_recipe": round(projected_block * full_blocks / 3600, 2),
        "total_seconds": round(total, 1),
        "mse_rtn_init_final": [(b["rtn_mse"], b["init_mse"], b["final_mse"]) for b in blocks],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"stage 1 on {result['shape']}, W{args.bits} g{args.group_size}, {args.images} tiles, batch {args.batch}")
    print(f"{'block':>5} {'seconds':>9} {'mse rtn':>10} {'mse init':>10} {'mse final':>10}")
    for b in blocks:
        print(f"{b['block']:>5} {b['seconds']:>9.1f} {b['rtn_mse']:>10.3g} {b['init_mse']:>10.3g} {b['final_mse']:>10.3g}")
    print(f"one AdaRound step (batch {args.batch}): {t_step:.2f} s; fixed cost per block: {fixed:.1f} s")
    print(f"peak MLX memory {result['peak_mlx_memory_gib']} GiB, peak RSS {result['peak_rss_gib']} GiB")
    print(f"projection at the recipe default ({recipe.iters} steps/block): {projected_block / 60:.1f} min/block, "
          f"{result['projected_hours_whole_tower_at_recipe']} h for all {full_blocks} blocks on this machine")
    print(f"wrote {args.json}")


def _time_steps(vcfg, cfg, n: int = 3) -> float:
    """Seconds per AdaRound step on one block (forward + backward + Adam)."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from speedq_mlx.quant import format as Q
    from speedq_mlx.quant.adaround import AdaRoundLinear
    from mlx_vlm.models.internvl_chat.vision import EncoderLayer

    from speedq_mlx.stages.stage1_vision import LINEARS, get_linear, set_linear

    twin = EncoderLayer(vcfg)
    ada = []
    for dotted in LINEARS.values():
        lin = get_linear(twin, dotted)
        s, b = Q.minmax_params(lin.weight, 2, 64)
        m = AdaRoundLinear(lin.weight, lin.get("bias"), s, b, 2, 64)
        set_linear(twin, dotted, m)
        ada.append(m)
    twin.freeze()
    for m in ada:
        m.unfreeze(keys=["V"])
    x = mx.random.normal((cfg.batch, 1025, vcfg.hidden_size))
    y = mx.random.normal(x.shape)
    opt = optim.Adam(1e-3)

    def loss(model):
        d = model(x) - y
        return (d * d).sum() + 0.01 * sum(Q.adaround_regularizer(m.V, 10.0) for m in ada)

    step = nn.value_and_grad(twin, loss)
    _, g = step(twin)
    opt.update(twin, g)
    mx.eval(twin.trainable_parameters(), opt.state)
    t0 = time.time()
    for _ in range(n):
        _, g = step(twin)
        opt.update(twin, g)
        mx.eval(twin.trainable_parameters(), opt.state)
    return (time.time() - t0) / n


if __name__ == "__main__":
    main()
