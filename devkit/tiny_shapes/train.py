"""Train the tiny-shapes model: a 0.62M-parameter InternVL2-layout VLM that answers
questions about rendered scenes (devkit/tiny_shapes/scenes.py), trained from scratch in MLX.

    python -m devkit.tiny_shapes.train --out speedq_mlx/assets/tiny-shapes

writes a Hugging Face-layout checkpoint (config keys and parameter names of
OpenGVLab/InternVL2-1B, fp16 weights, a tokenizer trained here) plus the bundled data:
images, conversations.jsonl (training scenes) and vqa_test.jsonl (test scenes).

The model is trained on two prompt formats: InternVL2's ChatML one (what `speedq-mlx
chat/eval` and the quantization stages use) and mlx-vlm's generic "User: ... Assistant:"
one (what stock `python -m mlx_vlm.generate` sends an internvl_chat model), so both
answer. Training is resumable (`--resume`), like the quantization stages.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from speedq_mlx.data import encode as data
from speedq_mlx.errors import SpeedQError
from speedq_mlx.model.chat_template import HERMES_2_SYSTEM
from speedq_mlx.model.forward import logits as vlm_logits
from speedq_mlx.model.registry import ASSETS
from speedq_mlx.model.synthetic import internvl_config, random_weights, train_tokenizer, write_checkpoint
from speedq_mlx.stages import losses as D

from . import scenes as S

ASSET_DIR = ASSETS / "tiny-shapes"
PATCH = 12
GENERIC_PROMPT = "User: <image>\n{question}\nAssistant:\n"  # mlx-vlm's internvl_chat chat template


# The shipped model's sizes, (hidden, layers) per tower. Narrow and deep beat wide and
# shallow here: 64x4/64x6 (0.62M parameters) scores 0.87 where 128x4/256x4 (4.5M) scored 0.73.
VISION_SIZE = (64, 4)
LANGUAGE_SIZE = (64, 6)


def model_config(vocab_size: int, vision: tuple = VISION_SIZE, language: tuple = LANGUAGE_SIZE) -> dict:
    """InternVL2-1B's config with small sizes, (hidden, layers) per tower; with hidden sizes
    that are multiples of 64, so is every linear input dim."""
    (vh, vl), (th, tl) = vision, language
    heads = max(2, th // 64)
    return internvl_config(
        vision={"hidden_size": vh, "intermediate_size": 4 * vh, "num_attention_heads": max(1, vh // 32),
                "num_hidden_layers": vl, "image_size": S.IMAGE_SIZE, "patch_size": PATCH},
        llm={"hidden_size": th, "intermediate_size": 3 * th, "num_attention_heads": heads,
             "num_key_value_heads": heads // 2, "num_hidden_layers": tl, "max_position_embeddings": 512,
             "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None},
        max_dynamic_patch=1,
    )


def parse_size(text: str) -> tuple[int, int]:
    """'HIDDENxLAYERS' (e.g. 128x4) -> (128, 4)."""
    try:
        hidden, layers = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIDDENxLAYERS such as 128x4, got {text!r}") from None
    if hidden % 64 or hidden <= 0 or layers <= 0:
        raise argparse.ArgumentTypeError(f"hidden size must be a positive multiple of 64, got {text!r}")
    return hidden, layers


def build_tokenizer():
    lines = S.corpus_lines() + [HERMES_2_SYSTEM, "<|im_start|>system\n", "<|im_start|>user\n",
                                "<|im_start|>assistant\n", "User: ", "Assistant:\n"]
    return train_tokenizer("\n".join(lines * 8), vocab_size=768)


def encode_qa(pixels: mx.array, qa: list[tuple[str, str]], generic: bool, enc: data.Encoder) -> data.Sample:
    """One sample: a ChatML conversation of (question, answer) turns about the image, or
    (generic=True) one turn in mlx-vlm's generic format."""
    if generic:
        (question, answer), = qa
        prompt = data.expand_images([{"role": "user", "content": GENERIC_PROMPT.format(question=question)}],
                                    [1], enc.num_image_token)[0]["content"]
        text = prompt + answer + "<|im_end|>"
        spans = [(len(prompt), len(text))]
    else:
        msgs = []
        for i, (q, a) in enumerate(qa):
            msgs += [{"role": "user", "content": ("<image>\n" if i == 0 else "") + q},
                     {"role": "assistant", "content": a}]
        text, spans = data.render_training_text(data.expand_images(msgs, [1], enc.num_image_token), enc.template)
    ids, mask = data.tokenize_with_mask(text, spans, enc.tokenizer)
    return data.Sample(ids, mask, pixels, [1])


def scene_samples(seed: int, start: int, n: int, enc: data.Encoder, generic: bool | None = None,
                  max_turns: int = 3):
    """Samples of scenes start..start+n of a stream: a third in mlx-vlm's generic format
    (one question), the rest ChatML conversations of 1..max_turns questions, unless
    `generic` fixes the format."""
    out = []
    for i in range(start, start + n):
        s = S.scene(seed, i)
        rng = random.Random(f"train:{seed}:{i}")
        g = rng.random() < 1 / 3 if generic is None else generic
        qa = []
        for _ in range(1 if g else rng.randint(1, max_turns)):
            _, q, a = S.sample_question(s, rng, exclude=[q for q, _ in qa])
            qa.append((q, a))
        pixels = enc.processor.preprocess([S.render(s)])["pixel_values"][0]
        out.append(encode_qa(pixels, qa, g, enc))
    return out


def answer_accuracy(model, batch: dict, image_token: int) -> float:
    """Share of samples whose every answer token is the argmax (teacher-forced)."""
    lg = vlm_logits(model, batch["input_ids"], batch["pixel_values"], image_token)
    pred = mx.argmax(lg[:, :-1], axis=-1)
    tgt, m = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    ok = ((pred == tgt) | (m == 0)).all(axis=1)
    return float(ok.astype(mx.float32).mean())


def hf_weights(model) -> dict:
    """MLX parameters -> Hugging Face layout (only the patch conv differs: OHWI -> OIHW)."""
    from mlx.utils import tree_flatten

    w = dict(tree_flatten(model.parameters()))
    k = "vision_model.embeddings.patch_embedding.weight"
    w[k] = w[k].transpose(0, 3, 1, 2)
    return w


def train(out: Path, run_dir: Path, steps: int, batch: int, lr: float, seed: int = 0,
          resume: bool = False, eval_every: int = 250, log=print, init_from: Path | None = None,
          vision: tuple = VISION_SIZE, language: tuple = LANGUAGE_SIZE) -> dict:
    """Train from a random init of the given sizes (or continue from `init_from`, a model
    folder this wrote, whose sizes it keeps)."""
    from mlx.utils import tree_flatten

    from speedq_mlx.model.internvl import image_token_id
    from speedq_mlx.model.io import load_model, load_tokenizer
    from speedq_mlx.run import RunFolder
    from speedq_mlx.train.loop import TrainConfig
    from speedq_mlx.train.loop import train as train_loop

    init_dir = Path(init_from) if init_from else run_dir / "init"
    if init_from and not (init_dir / "config.json").is_file():
        raise SpeedQError(f"no model to continue in {init_dir}")
    if not (init_dir / "config.json").is_file():
        tok = build_tokenizer()
        config = model_config(len(tok), vision, language)
        w = random_weights(config, seed)
        rng = np.random.default_rng(seed + 1)
        w["language_model.model.embed_tokens.weight"] = (rng.standard_normal(
            w["language_model.model.embed_tokens.weight"].shape) * 0.02).astype(np.float32)
        write_checkpoint(init_dir, config, w, tok)
    # the starting checkpoint is the one source of config and tokenizer from here on
    config = json.loads((init_dir / "config.json").read_text())
    sizes = [(c["hidden_size"], c["num_hidden_layers"]) for c in (config["vision_config"], config["llm_config"])]
    if not init_from and sizes != [tuple(vision), tuple(language)]:
        raise SpeedQError(f"{init_dir} holds a model of other sizes {sizes}; use another --run-dir")
    tok = load_tokenizer(init_dir)
    model = load_model(init_dir, mx.float32)
    image_token = image_token_id(tok)
    model.config.image_token_index = image_token
    enc = data.encoder(config, tok)
    pad = tok.pad_token_id

    held_out = data.collate(scene_samples(S.TEST_SEED, 10_000, 128, enc, max_turns=1), pad)

    def get_batch(step):
        # each --seed trains on its own part of the training stream (a continuation sees new scenes)
        return data.collate(scene_samples(S.TRAIN_SEED, seed * 10_000_000 + step * batch, batch, enc), pad)

    def loss_fn(m, b):
        lg = vlm_logits(m, b["input_ids"], b["pixel_values"], image_token)
        return D.cross_entropy(lg, b["input_ids"], b["loss_mask"]), {}, float(b["loss_mask"][:, 1:].sum())

    history = []

    def on_step(step):
        if step % eval_every == 0 or step == steps:
            acc = answer_accuracy(model, held_out, image_token)
            history.append({"step": step, "held_out_answer_accuracy": acc})
            log(f"step {step}: held-out answer accuracy {acc:.3f}")

    cfg = TrainConfig(steps=steps, lr=lr, warmup=0.05, weight_decay=0.01, grad_clip=1.0,
                      batch=batch, checkpoint_every=100, seed=seed)
    t0 = time.time()
    train_loop(model, loss_fn, get_batch, cfg, RunFolder(run_dir, resume), "tiny_shapes",
               f"tiny-shapes:{steps}:{batch}:{lr}:{seed}:{init_from}", log, on_step=on_step)
    report = {"steps": steps, "batch": batch, "lr": lr, "init_from": str(init_from) if init_from else None,
              "seconds": round(time.time() - t0, 1),
              "params": sum(v.size for _, v in tree_flatten(model.parameters())), "eval": history}
    write_model(out, model, config, tok, report)
    return report


def write_model(out: Path, model, config: dict, tok, report: dict) -> None:
    """The trained checkpoint (fp16) and the bundled data, replacing `out` atomically."""
    from speedq_mlx.run import atomic_dir

    with atomic_dir(Path(out)) as tmp:
        write_checkpoint(tmp / "model", config, hf_weights(model), tok, dtype=mx.float16)
        S.write_bundle(tmp)
        (tmp / "train_report.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/tiny-shapes-train"))
    ap.add_argument("--steps", type=int, default=6500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)  # 1e-3 (at 128x4/256x4): the vision tower collapsed to constant features
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision", type=parse_size, default=VISION_SIZE,
                    help="ViT HIDDENxLAYERS (default %dx%d)" % VISION_SIZE)
    ap.add_argument("--language", type=parse_size, default=LANGUAGE_SIZE,
                    help="language model HIDDENxLAYERS (default %dx%d)" % LANGUAGE_SIZE)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue training the model in this folder (e.g. OUT/model) instead of a random init")
    a = ap.parse_args(argv)
    import sys

    try:
        rep = train(a.out, a.run_dir, a.steps, a.batch, a.lr, a.seed, a.resume, init_from=a.init_from,
                    vision=a.vision, language=a.language)
    except SpeedQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in rep.items() if k != "eval"}), rep["eval"][-1] if rep["eval"] else "")


if __name__ == "__main__":
    main()
