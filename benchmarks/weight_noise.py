"""tiny-shapes: how much weight error the model tolerates. Prints a table, writes JSON.

Teacher-forced answer accuracy on held-out test-stream scenes when every linear of the
vision tower, projector and language model (not the embeddings, lm_head or patch conv)
gets either round-to-nearest at 2/3/4 bits, group 64, or Gaussian noise whose RMS is a
given multiple of the weight's own. Each row also gives the relative error it causes,
RMS(W' - W) / RMS(W) averaged over the linears, so RTN and noise sit on one scale: a
model that shrugs off noise several times larger than RTN's error cannot show RTN's
2-bit collapse, whatever the quantizer does.

    python -m benchmarks.weight_noise [--model tiny-shapes] [--items 384]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-shapes", help="tiny-shapes or a folder shapes_train wrote")
    ap.add_argument("--items", type=int, default=384, help="held-out questions (one per scene)")
    ap.add_argument("--noise", default="0.5,1,2,4", help="relative RMS of the Gaussian noise rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "weight_noise.json")
    a = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from speedq_mlx.data import encode as E
    from speedq_mlx.model import io as model_io
    from speedq_mlx.model.internvl import image_token_id
    from speedq_mlx.quant import plan
    from speedq_mlx.quant import format as Q
    from devkit.tiny_shapes import scenes as S
    from devkit.tiny_shapes.train import answer_accuracy, scene_samples

    source, _ = model_io.resolve_source(a.model)
    tok = model_io.load_tokenizer(source)
    image_token = image_token_id(tok)
    model = model_io.load_model(source, mx.float32, image_token)
    enc = E.encoder(model_io.read_config(source), tok)
    chunks = [E.collate(scene_samples(S.TEST_SEED, 20_000 + i, min(128, a.items - i), enc, max_turns=1),
                           tok.pad_token_id) for i in range(0, a.items, 128)]

    def accuracy() -> float:
        return sum(answer_accuracy(model, b, image_token) * b["input_ids"].shape[0] for b in chunks) / a.items

    original = dict(tree_flatten(model.parameters()))
    # the vision, projector and language linears: the components a recipe's bits apply to
    # (in parameter order, which fixes which noise draw each linear gets)
    targets = {f"{path}.weight" for path, m in plan.quantizable_modules(model).items()
               if isinstance(m, nn.Linear) and plan.component_of(path) in ("vision", "projector", "language")}
    linears = [k for k in original if k in targets]

    def run(name: str, perturb) -> dict:
        new = {k: perturb(original[k]) for k in linears}
        rel = sum(float(mx.sqrt(mx.mean((new[k] - original[k]) ** 2) / mx.mean(original[k] ** 2)))
                  for k in linears) / len(linears)
        model.load_weights(list({**original, **new}.items()))
        row = {"setting": name, "relative_error": round(rel, 3), "accuracy": round(accuracy(), 4)}
        print(f"{row['setting']:22} {row['relative_error']:8.3f} {row['accuracy']:9.4f}", flush=True)
        return row

    def rtn(bits):
        return lambda w: Q.fake_quantize(w, *Q.minmax_params(w, bits, 64), bits, 64)

    key = mx.random.key(a.seed)

    def noise(scale):
        def f(w):
            nonlocal key
            key, k = mx.random.split(key)
            return w + mx.random.normal(w.shape, key=k) * scale * mx.sqrt(mx.mean(w * w))
        return f

    print(f"{a.model}: {len(linears)} linears, {a.items} held-out questions (teacher-forced)")
    print(f"{'setting':22} {'rel err':>8} {'accuracy':>9}")
    rows = [run("full precision", lambda w: w)]
    rows += [run(f"RTN W{bits} g64", rtn(bits)) for bits in (4, 3, 2)]
    rows += [run(f"noise x{float(s):g}", noise(float(s))) for s in a.noise.split(",")]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"model": a.model, "items": a.items, "linears": len(linears),
                                  "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
