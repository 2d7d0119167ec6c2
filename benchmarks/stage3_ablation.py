"""Stage 3 ablation on real weights: RTN vs clip-init vs QAT(CE) vs QAT(distill) vs SPEED-Q.

The model is the InternVL-layout checkpoint whose language model is the real
SmolLM2-135M-Instruct (../shared/models). Training data are the full-precision
teacher's own answers to a fixed set of instructions (self-distillation data, as SPEED-Q
uses when labels are scarce); evaluation is KL(FP || quantized) per token and top-1
next-token agreement on held-out text and on held-out answers. Prints a table, writes JSON.

    python -m benchmarks.stage3_ablation --bits 2 --steps 150
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


PROMPTS = [
    "What is the capital of France?", "Explain what a rainbow is.", "Give three tips for staying healthy.",
    "What does a bee do?", "Describe a sunny beach.", "Why do leaves change colour in autumn?",
    "How do you make a cup of tea?", "What is photosynthesis?", "Name three planets.",
    "What is the largest ocean on Earth?", "Write a sentence about a dog.", "What are clouds made of?",
    "How does a bicycle work?", "What is the boiling point of water?", "Describe a busy city street.",
    "Why is the sky blue?", "What do plants need to grow?", "Explain what a computer does.",
    "What is a volcano?", "How many days are in a week?", "Describe your favourite fruit.",
    "What is the moon?", "Why do we sleep?", "What is a library?", "How do birds fly?",
    "What is music?", "Explain gravity simply.", "What does a doctor do?", "Describe a forest.",
    "What is the difference between a lake and a river?", "How do you plant a tree?",
    "What is snow?", "Why is exercise good for you?", "What is a map used for?",
    "Describe a thunderstorm.", "What is an island?", "How does a refrigerator keep food cold?",
    "What is a museum?", "Explain what a recipe is.", "What do cows eat?", "What is the sun?",
    "How do fish breathe?", "Describe a mountain.", "What is a desert?", "Why do we need water?",
    "What is a calendar?", "How is bread made?", "What is electricity?",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
HELD_OUT_TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure "
    "is lower, so water boils at a lower temperature, and food takes longer to cook. To make a "
    "simple loaf of bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for "
    "about ten minutes until it is smooth, then leave it in a warm place to rise for an hour. The "
    "planets of the solar system are Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and "
    "Neptune. Jupiter is the largest planet, and Mercury is the closest to the Sun."
)


def teacher_answers(model, tok, prompts, path: Path, max_tokens=48) -> list:
    """Greedy answers of the full-precision model, cached as JSON."""
    if path.is_file():
        return json.loads(path.read_text())
    from mlx_vlm.models.cache import KVCache

    from speedq_mlx.model.chat_template import render

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for p in prompts:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
        ids = tok.encode(render("Hermes-2", msgs), add_special_tokens=False)
        cache = [KVCache() for _ in model.language_model.model.layers]
        logits = model.language_model(mx.array([ids]), cache=cache).logits
        ans = []
        for _ in range(max_tokens):
            nxt = int(mx.argmax(logits[0, -1]).item())
            if nxt == eos:
                break
            ans.append(nxt)
            logits = model.language_model(mx.array([[nxt]]), cache=cache).logits
        out.append({"prompt": p, "answer": tok.decode(ans).strip()})
    path.write_text(json.dumps(out, indent=1))
    return out


def evaluate(model, ref_logits: dict, batches: dict) -> dict:
    from speedq_mlx.model.forward import logits as vlm_logits

    res = {}
    for name, (ids, mask) in batches.items():
        lg = np.array(vlm_logits(model, ids).astype(mx.float32))[:, :-1]
        ref = ref_logits[name]
        m = np.array(mask)[:, 1:].astype(bool)
        lp = ref - np.logaddexp.reduce(ref, -1, keepdims=True)
        lq = lg - np.logaddexp.reduce(lg, -1, keepdims=True)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)[m]
        agree = (lg.argmax(-1) == ref.argmax(-1))[m]
        res[name] = {"kl": float(kl.mean()), "top1": float(agree.mean())}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--configs", default="rtn,clip,qat_ce,qat_kd,speedq",
                    help="comma list of rtn, clip, qat_ce, qat_kd, speedq, speedq_lq (learned scales/biases)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/speedq-ablation"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tag = "" if args.configs == ap.get_default("configs") else "_" + args.configs.replace(",", "-")
    args.json = args.json or Path(__file__).parent / "results" / f"stage3_ablation_w{args.bits}{tag}.json"

    from speedq_mlx.model import io as model_io
    from speedq_mlx.model.internvl import image_token_id
    from speedq_mlx.data import encode as E, records as R
    from devkit.smollm import build_smollm_checkpoint
    from devkit.testing import make_run
    from speedq_mlx.data.sources import TrainData
    from speedq_mlx.pipeline import prepare_stage3
    from speedq_mlx.quant.clip import clip_init
    from speedq_mlx.quant.plan import apply_plan, build_plan, select
    from speedq_mlx.stages.common import StageConfig, collate
    from speedq_mlx.stages.stage3_language import TRAINED, run_stage3
    from speedq_mlx.stages.teacher import Teacher
    from speedq_mlx.train.loop import TrainConfig

    ck = args.work / "smollm-internvl"
    if not (ck / "config.json").is_file():
        build_smollm_checkpoint(ck)
    tok = model_io.load_tokenizer(ck)
    img = image_token_id(tok)
    teacher = model_io.load_model(ck, mx.float32, img)
    qa = teacher_answers(teacher, tok, PROMPTS, args.work / "teacher_answers.json")
    enc = E.encoder(model_io.read_config(ck), tok)
    records = [R.Record(messages=[{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["answer"]}], source=f"qa:{i}")
               for i, r in enumerate(qa)]
    samples = [E.encode(r, enc) for r in records]
    train_s, held_s = samples[:40], samples[40:]
    pad = tok.pad_token_id
    held = collate(held_s, pad)
    text_ids = tok.encode(HELD_OUT_TEXT, add_special_tokens=False)
    batches = {"held_out_text": (mx.array([text_ids]), mx.array([[1] * len(text_ids)])),
               "held_out_answers": (held["input_ids"], held["loss_mask"])}
    from speedq_mlx.model.forward import logits as vlm_logits

    ref_logits = {k: np.array(vlm_logits(teacher, ids).astype(mx.float32))[:, :-1] for k, (ids, _) in batches.items()}
    calib = [collate(train_s[i : i + 8], pad) for i in range(0, 40, 8)]
    settings = {"vision": None, "projector": None, "language": (args.bits, args.group_size),
                "embeddings": (4, 32), "lm_head": (4, 32)}
    variants = {
        "rtn": None,
        "clip": "clip",
        "qat_ce": dict(distill_weight=0.0, ce_weight=1.0),
        "qat_kd": dict(distill_weight=1.0, ce_weight=0.0),
        "speedq": dict(distill_weight=1.0, ce_weight=1.0),
        "speedq_lq": dict(distill_weight=1.0, ce_weight=1.0, learn_qparams=True),
    }
    results = {}
    for name in args.configs.split(","):
        t0 = time.time()
        student = model_io.load_model(ck, mx.float32, img)
        plan = build_plan(student, settings)
        if name == "rtn":
            apply_plan(student, plan, scale_dtype=mx.float16)
        elif name == "clip":
            cfg = StageConfig(train=TrainConfig())
            prepare_stage3(student, plan, cfg, mx.float16)
            layers = {p: s for p, s in select(plan, *TRAINED).items() if s is not None}
            clip_init(student, layers, cfg.clip_skip, calib, img, mx.float32, mx.float16,
                      log=lambda *a: None)
        else:
            cfg = StageConfig(train=TrainConfig(steps=args.steps, lr=args.lr, batch=args.batch,
                                                checkpoint_every=10**9),
                              train_projector=False, **variants[name])
            run_dir = args.work / f"run-w{args.bits}-{name}"
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            prepare_stage3(student, plan, cfg, mx.float16)
            run_stage3(make_run(ck, run_dir), student, Teacher(lambda: teacher), plan, TrainData(train_s),
                       calib, cfg)
        results[name] = {**evaluate(student, ref_logits, batches), "seconds": round(time.time() - t0, 1)}
        print(name, results[name], flush=True)
    out = {"model": "SmolLM2-135M-Instruct in InternVL layout", "bits": args.bits,
           "group_size": args.group_size, "embeddings": "4-bit g32", "steps": args.steps, "lr": args.lr,
           "batch": args.batch, "train_samples": len(train_s), "held_out_answers": len(held_s),
           "held_out_text_tokens": len(text_ids), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nW{args.bits} g{args.group_size}, {args.steps} steps x batch {args.batch}, lr {args.lr}")
    print(f"{'method':<8} {'KL text':>9} {'top1 text':>10} {'KL answers':>11} {'top1 ans':>9} {'sec':>6}")
    for name, r in results.items():
        t, a = r["held_out_text"], r["held_out_answers"]
        print(f"{name:<8} {t['kl']:>9.3f} {t['top1']:>10.3f} {a['kl']:>11.3f} {a['top1']:>9.3f} {r['seconds']:>6}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
