"""Stage 3 step cost on the InternVL2-1B language model shape (random weights, fp32).

Measures, at batch --batch x --tokens text tokens (Qwen2-0.5B decoder, vocab 151655):
  plain   a full-precision training step of the same weights (the decoder linears, CE)
  cached  a SPEED-Q QAT step with cached teacher top-k targets (CAKLD + CE)
  live    a SPEED-Q QAT step with the full-precision teacher run live on the batch
with step time, tokens/s and peak MLX memory; prints a table, writes JSON.

    python -m benchmarks.qat_step --tokens 512 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim



def build(config: dict):
    from mlx_vlm.models.internvl_chat import internvl_chat as M
    from mlx_vlm.models.internvl_chat.config import ModelConfig, TextConfig, VisionConfig

    cfg = dict(config)
    cfg["text_config"] = cfg.pop("llm_config")
    mc = ModelConfig.from_dict(cfg)
    mc.text_config = TextConfig.from_dict(cfg["text_config"])
    mc.vision_config = VisionConfig.from_dict({**cfg["vision_config"], "num_hidden_layers": 1})
    model = M.Model(mc)
    mx.eval(model.parameters())
    return model


def time_steps(model, loss, steps: int) -> float:
    opt = optim.AdamW(1e-5)
    step = nn.value_and_grad(model, lambda: loss(model))  # closed over, as train_loop does
    _, g = step()  # warm-up (graph building, allocations)
    opt.update(model, g)
    mx.eval(model.trainable_parameters(), opt.state)
    t0 = time.time()
    for _ in range(steps):
        _, g = step()
        opt.update(model, g)
        mx.eval(model.trainable_parameters(), opt.state)
    return (time.time() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qat_step.json")
    args = ap.parse_args()

    from speedq_mlx.stages import losses as D
    from speedq_mlx.model.forward import logits as vlm_logits
    from speedq_mlx.model.synthetic import internvl_config
    from speedq_mlx.quant.plan import apply_plan, build_plan

    config = internvl_config(vision={}, llm={})
    ids = mx.random.randint(0, 151000, (args.batch, args.tokens), key=mx.random.key(0))
    mask = mx.ones_like(ids)
    n_tok = args.batch * args.tokens
    results = {}

    # plain full-precision training step
    model = build(config)
    model.freeze()
    for layer in model.language_model.model.layers:
        for name in ("self_attn", "mlp"):
            getattr(layer, name).unfreeze()
    mx.reset_peak_memory()
    plain = time_steps(model, lambda m: D.cross_entropy(vlm_logits(m, ids), ids, mask), args.steps)
    results["plain"] = {"seconds": plain, "peak_gib": mx.get_peak_memory() / 2**30}
    print("plain", results["plain"], flush=True)
    del model
    gc.collect()
    mx.clear_cache()

    settings = {"vision": None, "projector": None, "language": (args.bits, 64),
                "embeddings": (4, 32), "lm_head": (4, 32)}

    def student():
        m = build(config)
        apply_plan(m, build_plan(m, settings), scale_dtype=mx.float16)
        m.freeze()
        for p, mod in m.named_modules():
            if p.startswith("language_model.model.layers.") and type(mod).__name__ == "QuantLinear":
                mod.unfreeze()
        return m

    # QAT with cached top-k targets (what the teacher pass writes to disk)
    s = student()
    teacher_top = (mx.random.randint(0, 151000, (args.batch, args.tokens, args.topk)).astype(mx.int32),
                   mx.log(mx.softmax(mx.random.normal((args.batch, args.tokens, args.topk)), axis=-1) * 0.9))
    mx.eval(teacher_top)

    def qat_loss(m, teacher):
        lg = vlm_logits(m, ids)
        return D.distill_loss(lg, teacher, ids, mask, "cakld", 0.5) + D.cross_entropy(lg, ids, mask, 0.1)

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cached = time_steps(s, lambda m: qat_loss(m, teacher_top), args.steps)
    results["cached"] = {"seconds": cached, "peak_gib": mx.get_peak_memory() / 2**30}
    print("cached", results["cached"], flush=True)
    gc.collect()
    mx.clear_cache()

    # QAT with the live teacher (a second, full-precision copy of the model)
    teacher = build(config)
    teacher.freeze()
    mx.reset_peak_memory()
    live = time_steps(s, lambda m: qat_loss(m, mx.stop_gradient(vlm_logits(teacher, ids))), args.steps)
    results["live"] = {"seconds": live, "peak_gib": mx.get_peak_memory() / 2**30}

    for r in results.values():
        r["tokens_per_s"] = n_tok / r["seconds"]
        r["ratio_to_plain"] = r["seconds"] / plain
    out = {"shape": "InternVL2-1B language model (Qwen2-0.5B, vocab 151655), fp32",
           "batch": args.batch, "tokens": args.tokens, "bits": args.bits, "topk": args.topk,
           "steps_timed": args.steps, "results": results,
           "target": "cached QAT step <= 1.5 x plain step",
           "target_met": results["cached"]["ratio_to_plain"] <= 1.5}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{out['shape']}, batch {args.batch} x {args.tokens} tokens, W{args.bits} g64")
    print(f"{'step':<8} {'seconds':>8} {'tokens/s':>9} {'peak GiB':>9} {'x plain':>8}")
    for k, r in results.items():
        print(f"{k:<8} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} {r['peak_gib']:>9.2f} {r['ratio_to_plain']:>8.2f}")
    print(f"target (cached <= 1.5 x plain): {'met' if out['target_met'] else 'NOT met'}; wrote {args.json}")


if __name__ == "__main__":
    main()
