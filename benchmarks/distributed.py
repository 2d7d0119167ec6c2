"""Data-parallel SPEED-Q: steps/s with 1 and 2 ranks on this machine, and a projection
of the communication cost for N Macs on InternVL2-1B.

Measured: for each model (`tiny`: the tests' tiny InternVL2-layout model; `smollm`: the
real SmolLM2-135M language model in an InternVL layout, when its GGUF is present), the
real `speedq-mlx quantize` (stages 1, 2, 3; live teacher) runs once as one process and
once as two ranks under `mlx.launch --backend ring -n 2` on 127.0.0.1, with the same
global batches and seed. The machine's cores are shared out: OPENBLAS_NUM_THREADS is
cores / ranks. Per-step times come from the runs' own logs (stage 2/3 `*_log.jsonl`:
tokens / tokens_per_s, the first step left out as warm-up; they include the gradient
all-reduce); stage 1 from `stage1_report.json` (seconds per ViT block: AdaRound steps
plus the block's calibration forwards and error measurements). Also measured: the
ring all-reduce bandwidth between the two local ranks.

Projected: the stage-3 gradient all-reduce for InternVL2-1B (the trainable set of stage
3: the language decoder's linears - latent weights and biases - and the projector mlp1;
fp32 gradients) over a ring of N machines, each moving 2(N-1)/N x the gradient bytes
per step, at the line rate of 10 GbE, Thunderbolt 4 and Thunderbolt 5; against a
compute time per step estimated from FLOPs at an ASSUMED sustained fp32 rate per Mac
(--mac-tflops; not measured here: this machine has no Mac).

    python -m benchmarks.distributed                     # both models: ~10-13 min on 2 cores
    python -m benchmarks.distributed --models tiny       # ~30 s

(smollm's runs take 3-7 min each here. On 2 shared cores two ranks cannot be faster
than one: the table measures the overhead of the distributed path, not a speed-up.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from devkit.ports import free_port_pair

LAUNCH = Path(sys.executable).with_name("mlx.launch")
QA = [("What colour is it?", "It is mostly blue."), ("Describe the image.", "A small picture."),
      ("Is there text?", "No, there is no text."), ("How many shapes?", "There are three shapes."),
      ("What is in the picture?", "Some coloured shapes on a plain background."),
      ("Write a caption.", "Bright shapes in a row."), ("Is it dark?", "No, it is quite bright."),
      ("What stands out?", "The red shape in the middle.")]
LINKS = {"10 GbE": 10e9, "Thunderbolt 4 (40 Gb/s)": 40e9, "Thunderbolt 5 (80 Gb/s)": 80e9}


def recipe_text(a) -> str:
    return f"""[quant]
bits = 2
group_size = 64
[quant.embeddings]
bits = 4
group_size = 32
[quant.lm_head]
bits = 4
group_size = 32
[stage1]
images = 8
iters = {a.stage1_iters}
batch = {a.batch * 2}
[stage2]
steps = {a.steps}
lr = 1e-4
batch = {a.batch}
checkpoint_every = 1000
[stage3]
steps = {a.steps}
lr = 1e-5
batch = {a.batch}
checkpoint_every = 1000
gamma_batches = 1
teacher = "live"
clip_tokens = 64
clip_windows = 8
"""


def build_models(work: Path, names: list[str]) -> dict:
    from speedq_mlx.model.synthetic import build_tiny_checkpoint
    from devkit.smollm import DEFAULT_GGUF, build_smollm_checkpoint

    out = {}
    for name in names:
        path = work / "models" / name
        if name == "smollm" and not Path(DEFAULT_GGUF).is_file():
            print(f"skipping smollm: {DEFAULT_GGUF} not found")
            continue
        if not (path / "config.json").is_file():
            t0 = time.time()
            (build_tiny_checkpoint if name == "tiny" else build_smollm_checkpoint)(path)
            print(f"built {name} in {time.time() - t0:.1f}s")
        out[name] = path
    return out


def run(cmd: list, env: dict, log: Path, timeout: int) -> float:
    """Run with stdin an open pipe (mlx.launch forwards stdin); returns wall seconds."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE, stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            raise SystemExit(f"{cmd[:4]} ran past {timeout}s (log: {log})")
        finally:
            p.stdin.close()
    return time.time() - t0


def step_times(log_path: Path) -> list[float]:
    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    return [r["tokens"] / r["tokens_per_s"] for r in rows]


def quantize_once(model: Path, ranks: int, work: Path, a) -> dict:
    out = work / f"{model.name}-r{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cores = os.cpu_count() or 1
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(max(1, cores // ranks)), "TQDM_DISABLE": "1"}
    argv = [sys.executable, "-m", "speedq_mlx", "quantize", "-m", model, "--recipe", work / "recipe.toml",
            "--images", ROOT / "examples" / "images", "--data", work / "conv.jsonl", "--max-tiles", "2",
            "-o", out / "art", "--run-dir", out / "run"]
    cmd = argv if ranks == 1 else [LAUNCH, "--backend", "ring", "-n", ranks, "--starting-port",
                                   free_port_pair(), "--", *argv]
    load0 = os.getloadavg()[0]
    wall = run(cmd, env, out / "log.txt", a.timeout)
    if not (out / "art" / "model.safetensors").is_file():
        raise SystemExit(f"{model.name} with {ranks} rank(s) failed; see {out / 'log.txt'}:\n"
                         + (out / "log.txt").read_text()[-2000:])
    res = {"ranks": ranks, "openblas_threads": env["OPENBLAS_NUM_THREADS"], "wall_s": round(wall, 2),
           "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    report = json.loads((out / "run" / "stage1_report.json").read_text())
    secs = [b["seconds"] for b in report["blocks"] if "seconds" in b]
    res["stage1_s_per_block"] = round(statistics.mean(secs), 3)
    for name in ("stage2", "stage3"):
        dts = step_times(out / "run" / f"{name}_log.jsonl")[1:]
        res[f"{name}_s_per_step"] = round(statistics.mean(dts), 4)
        res[f"{name}_steps_per_s"] = round(1 / statistics.mean(dts), 3)
    return res


def trainable_counts() -> dict:
    """Gradient sizes of the stage-3 trainable set, counted on lazily built models (shapes
    only: MLX does not materialise parameters that are never evaluated)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from speedq_mlx.model.synthetic import internvl_config

    def count(config: dict) -> dict:
        from mlx_vlm.models.internvl_chat import internvl_chat as M
        from mlx_vlm.models.internvl_chat.config import ModelConfig, TextConfig, VisionConfig

        cfg = dict(config)
        cfg["text_config"] = cfg.pop("llm_config")
        mc = ModelConfig.from_dict(cfg)
        mc.text_config = TextConfig.from_dict(cfg["text_config"])
        mc.vision_config = VisionConfig.from_dict(cfg["vision_config"])
        model = M.Model(mc)
        lang = sum(v.size for p, m in model.language_model.model.named_modules()
                   if isinstance(m, nn.Linear) and p.startswith("layers.")
                   for _, v in tree_flatten(m.parameters()))
        proj = sum(v.size for layer in model.mlp1 if isinstance(layer, nn.Module)
                   for _, v in tree_flatten(layer.parameters()))
        lm = sum(v.size for p, m in model.language_model.named_modules()
                 if isinstance(m, nn.Linear) for _, v in tree_flatten(m.parameters()))
        vit = sum(v.size for _, v in tree_flatten(model.vision_model.parameters()))
        return {"language_linears": lang, "projector": proj, "trainable": lang + proj,
                "lm_matmul_params": lm, "vit_params": vit,
                "vit_tokens_per_tile": (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2 + 1}

    return {"internvl2-1b": count(internvl_config(vision={}, llm={}))}


def ring_bandwidth(work: Path, mib: int, timeout: int) -> dict:
    """Two local ranks all-sum a `mib` MiB fp32 buffer; algorithm bandwidth = bytes / time."""
    script = work / "allreduce.py"
    script.write_text(f"""import json, time, mlx.core as mx
g = mx.distributed.init()
x = mx.ones(({mib} * 2**20 // 4,))
mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
ts = []
for _ in range(5):
    t0 = time.time(); mx.eval(mx.distributed.all_sum(x, stream=mx.cpu)); ts.append(time.time() - t0)
if g.rank() == 0:
    print("RESULT", json.dumps({{"seconds": min(ts)}}), flush=True)
""")
    log = work / "allreduce.log"
    run([LAUNCH, "--backend", "ring", "-n", 2, "--starting-port", free_port_pair(), "--",
         sys.executable, script], dict(os.environ), log, timeout)
    line = [l for l in log.read_text().splitlines() if l.startswith("RESULT")]
    if not line:
        return {"error": log.read_text()[-500:]}
    s = json.loads(line[0].split(" ", 1)[1])["seconds"]
    return {"bytes": mib * 2**20, "seconds": round(s, 4), "gbit_per_s": round(mib * 2**20 * 8 / s / 1e9, 2)}


def projection(counts: dict, a) -> dict:
    c = counts["internvl2-1b"]
    grad_bytes = 4 * c["trainable"]
    # FLOPs per training sample (stage 3, live teacher): student LM forward + backward
    # (6 x matmul params x tokens), teacher LM forward (2x), student and teacher ViT
    # forwards on each tile (2 x 2x; the frozen ViT needs no backward)
    flops = (8 * c["lm_matmul_params"] * a.tokens_per_sample
             + 4 * c["vit_params"] * c["vit_tokens_per_tile"] * a.tiles_per_sample)
    t_sample = flops / (a.mac_tflops * 1e12)
    rows = []
    for n in (1, 2, 4, 8):
        vol = 2 * (n - 1) / n * grad_bytes
        for batch in (4, 16, 64):
            if batch < n:
                continue
            t_comp = batch / n * t_sample
            row = {"machines": n, "global_batch": batch, "bytes_per_rank_per_step": vol,
                   "compute_s": round(t_comp, 3)}
            for link, bps in LINKS.items():
                t_comm = vol * 8 / bps
                t_step = t_comp + t_comm  # no overlap assumed: MLX reduces after the backward
                row[link] = {"comm_s": round(t_comm, 3), "step_s": round(t_step, 3),
                             "speedup": round(batch * t_sample / t_step, 2)}
            rows.append(row)
    return {"trainable_params": c["trainable"], "language_linear_params": c["language_linears"],
            "projector_params": c["projector"], "gradient_bytes": grad_bytes,
            "flops_per_sample": flops, "assumed_mac_tflops": a.mac_tflops,
            "tokens_per_sample": a.tokens_per_sample, "tiles_per_sample": a.tiles_per_sample,
            "compute_s_per_sample": round(t_sample, 3), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm")
    ap.add_argument("--steps", type=int, default=8, help="stage 2 and 3 steps per run")
    ap.add_argument("--batch", type=int, default=4, help="global batch of stages 2/3 (stage 1: 2x)")
    ap.add_argument("--stage1-iters", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/speedq-distributed-bench"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--allreduce-mib", type=int, default=64)
    ap.add_argument("--mac-tflops", type=float, default=10.0,
                    help="ASSUMED sustained fp32 TFLOP/s of one Mac in training (projection only)")
    ap.add_argument("--tokens-per-sample", type=int, default=512,
                    help="language tokens per training sample (256 image tokens per tile + text)")
    ap.add_argument("--tiles-per-sample", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    a = ap.parse_args()
    if not LAUNCH.is_file():
        raise SystemExit(f"mlx.launch not found beside {sys.executable}")

    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "recipe.toml").write_text(recipe_text(a))
    imgs = sorted((ROOT / "examples" / "images").iterdir())
    (a.work / "conv.jsonl").write_text("\n".join(json.dumps({"image": str(imgs[i % len(imgs)]), "conversations": [
        {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": ans}]}) for i, (q, ans) in enumerate(QA * 2)))
    models = build_models(a.work, a.models.split(","))
    measured = {}
    for name, path in models.items():
        measured[name] = [quantize_once(path, r, a.work, a) for r in (1, 2)]
    bw = ring_bandwidth(a.work, a.allreduce_mib, a.timeout)
    proj = projection(trainable_counts(), a)

    import platform

    import mlx.core as mx

    out = {"command": " ".join(["python", "benchmarks/distributed.py", *sys.argv[1:]]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "mlx": mx.__version__},
           "settings": {"steps": a.steps, "batch": a.batch, "stage1_batch": 2 * a.batch,
                        "stage1_iters": a.stage1_iters},
           "measured": measured, "local_ring_allreduce": bw, "projection": proj}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))

    print(f"\nmeasured on this machine ({os.cpu_count()} cores, Linux CPU, MLX {mx.__version__}); "
          f"global batch {a.batch} (stage 1: {2 * a.batch} tiles), cores shared between ranks")
    hdr = (f"{'model':<8} {'ranks':>5} {'BLAS thr':>8} {'st1 s/block':>11} {'st2 steps/s':>11} "
           f"{'st3 steps/s':>11} {'st3 x1 rank':>11} {'wall s':>7} {'load before/after':>17}")
    print(hdr)
    print("-" * len(hdr))
    for name, rows in measured.items():
        base = rows[0]["stage3_steps_per_s"]
        for r in rows:
            print(f"{name:<8} {r['ranks']:>5} {r['openblas_threads']:>8} {r['stage1_s_per_block']:>11.3f} "
                  f"{r['stage2_steps_per_s']:>11.3f} {r['stage3_steps_per_s']:>11.3f} "
                  f"{r['stage3_steps_per_s'] / base:>11.2f} {r['wall_s']:>7.1f} "
                  f"{'%.2f / %.2f' % tuple(r['loadavg_1min_before_after']):>17}")
    print("(load: 1-minute load average before and after the run; above ~2 on this 2-core "
          "machine means other work shared the cores)")
    if "gbit_per_s" in bw:
        print(f"local ring all-reduce, 2 ranks, {a.allreduce_mib} MiB fp32: {bw['seconds']:.3f} s "
              f"({bw['gbit_per_s']} Gb/s of buffer per second)")

    p = proj
    print("\nprojection: InternVL2-1B stage 3 on N Macs (ring all-reduce of fp32 gradients)")
    print(f"  trainable: {p['language_linear_params'] / 1e6:.1f}M language-linear params (latent "
          f"weights + biases) + {p['projector_params'] / 1e6:.2f}M projector = "
          f"{p['trainable_params'] / 1e6:.1f}M -> {p['gradient_bytes'] / 1e9:.3f} GB of gradients per step")
    print("  each rank sends and receives 2(N-1)/N x that per step; links at line rate (real links give less)")
    print(f"  compute per sample ASSUMED: {p['flops_per_sample'] / 1e12:.2f} TFLOP "
          f"({p['tokens_per_sample']} LM tokens, {p['tiles_per_sample']} tile, live teacher) at "
          f"{p['assumed_mac_tflops']} TFLOP/s sustained = {p['compute_s_per_sample']:.2f} s; no overlap of "
          f"compute and communication")
    links = list(LINKS)
    hdr = f"{'N':>2} {'batch':>5} {'GB/rank/step':>12} {'compute s':>9} " + " ".join(
        f"{l.split(' (')[0] + ' comm/step/xN':>30}" for l in links)
    print(hdr)
    print("-" * len(hdr))
    for r in p["rows"]:
        cells = " ".join(f"{r[l]['comm_s']:>8.3f}s {r[l]['step_s']:>8.3f}s {r[l]['speedup']:>6.2f}x  "
                         for l in links)
        print(f"{r['machines']:>2} {r['global_batch']:>5} {r['bytes_per_rank_per_step'] / 1e9:>12.3f} "
              f"{r['compute_s']:>9.3f} {cells}")
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
