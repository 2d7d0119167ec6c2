#!/usr/bin/env python
"""Round-to-nearest export of an InternVL2-1B-shaped model: time, peak memory, size.

Builds a Hugging Face checkpoint with InternVL2-1B's real config (vision InternViT-300M,
Qwen2-0.5B decoder, vocab 151655, ~938M parameters) and random weights, then runs
`speedq-mlx quantize` on it once per configuration, each in its own child process, and
records wall time, the child's peak RSS, the artifact's size on disk and the per-component
parameters / bits-per-weight / MiB that `speedq-mlx inspect --json` reports.

    python -m benchmarks.rtn_export [--work DIR] [--rebuild] [--json PATH] [--configs w2,w4]

The checkpoint (~1.9 GB, float16) is reused from --work when it is already there.
Target checked: the W2 artifact (embeddings and lm_head 4-bit g32) is <= 380 MB,
reported both for MB = 1e6 bytes and for MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "rtn_export.json"
TARGET_MB = 380
COMPONENTS = ("vision", "projector", "language", "embeddings", "lm_head", "other")

# name -> (description, --bits, recipe TOML text or None for the model's default recipe)
EMB_RECIPE = """description = "benchmark: linears {bits}-bit g64; embeddings and lm_head {eb}-bit g{eg}."

[quant]
bits = {bits}
group_size = 64

[quant.embeddings]
bits = {eb}
group_size = {eg}

[quant.lm_head]
bits = {eb}
group_size = {eg}
"""
CONFIGS = {
    "w2": ("W2: linears 2-bit g64, emb+lm_head 4-bit g32 (default recipe)", 2, None),
    "w4": ("W4: linears 4-bit g64, emb+lm_head 4-bit g32 (default recipe)", 4, None),
    "w2-emb3g64": ("W2, emb+lm_head 3-bit g64", 2, EMB_RECIPE.format(bits=2, eb=3, eg=64)),
    "w2-emb2g64": ("W2, emb+lm_head 2-bit g64", 2, EMB_RECIPE.format(bits=2, eb=2, eg=64)),
}


# --------------------------------------------------------------------------- helpers

def cli() -> list[str]:
    exe = Path(sys.executable).with_name("speedq-mlx")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "speedq_mlx"]


def child_env() -> dict:
    env = dict(os.environ)  # (the children load a fast BLAS themselves: speedq_mlx/blas.py)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_measured(cmd: list[str], log_file: Path) -> dict:
    """Run cmd as a child; its own wall time, peak RSS (wait4) and exit code."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "log": str(log_file)}


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- checkpoint

def build_checkpoint(out_dir: str, seed: int, dtype: str) -> None:
    """Runs in a child process (see --_build): real InternVL2-1B config, random weights."""
    import numpy as np

    from speedq_mlx.model.synthetic import internvl_config, random_weights, train_tokenizer, write_checkpoint

    t0 = time.perf_counter()
    config = internvl_config(vision={}, llm={})  # InternVL2-1B as published, vocab 151655
    tokenizer = train_tokenizer()
    weights = random_weights(config, seed=seed, dtype=np.dtype(dtype))
    t1 = time.perf_counter()
    tmp = Path(out_dir).with_name(Path(out_dir).name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, config, weights, tokenizer)
    del weights
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"random weights {t1 - t0:.1f}s, write {time.perf_counter() - t1:.1f}s", flush=True)


def checkpoint_info(ckpt: Path) -> dict:
    from speedq_mlx.model.io import safetensors_header

    header = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        header.update(safetensors_header(f))
    dtypes = sorted({v["dtype"] for v in header.values()})
    cfg = json.loads((ckpt / "config.json").read_text())
    return {"path": str(ckpt), "params": sum(numel(v["shape"]) for v in header.values()),
            "tensors": len(header), "dtypes": dtypes, "size_bytes": tree_bytes(ckpt),
            "vocab_size": cfg["llm_config"]["vocab_size"]}


def ensure_checkpoint(work: Path, rebuild: bool, seed: int, dtype: str) -> tuple[Path, dict | None]:
    ckpt = work / "internvl2-1b-random"
    if ckpt.is_dir() and (ckpt / "model.safetensors").is_file() and not rebuild:
        print(f"reusing checkpoint {ckpt}", flush=True)
        return ckpt, None
    print(f"building InternVL2-1B-shaped checkpoint in {ckpt} ({dtype}, seed {seed}) ...", flush=True)
    m = run_measured([sys.executable, "-m", "benchmarks.rtn_export", "--_build", str(ckpt), "--seed", str(seed),
                      "--dtype", dtype], work / "logs" / "build.log")
    if m["rc"] != 0:
        sys.exit(f"checkpoint build failed (rc {m['rc']}); see {m['log']}")
    print(f"  built in {m['wall_s']:.1f}s, peak RSS {m['peak_rss_mib']:.0f} MiB", flush=True)
    return ckpt, m


# --------------------------------------------------------------------------- export runs

def run_config(name: str, ckpt: Path, work: Path, keep: bool) -> dict:
    desc, bits, recipe_text = CONFIGS[name]
    out = work / "artifacts" / name
    cmd = [*cli(), "quantize", "--model", str(ckpt), "--bits", str(bits), "-o", str(out), "--overwrite"]
    recipe = None
    if recipe_text is not None:
        recipe = work / "recipes" / f"{name}.toml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_text)
        cmd += ["--recipe", str(recipe)]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    m = run_measured(cmd, work / "logs" / f"quantize-{name}.log")
    log_text = Path(m["log"]).read_text()
    result = {"name": name, "description": desc, "bits": bits,
              "recipe": str(recipe) if recipe else "default (recipes/default.toml with --bits)",
              "recipe_toml": recipe_text, **m}
    for line in log_text.splitlines():  # pipeline's own timer: load + quantize + write
        if line.startswith("done in ") and line.endswith("s"):
            result["pipeline_s"] = float(line[len("done in "):-1])
        if line.startswith("recipe "):
            result["settings_line"] = line
    if m["rc"] != 0:
        print(f"[{name}] FAILED rc={m['rc']}; last lines of {m['log']}:\n"
              + "\n".join(log_text.splitlines()[-15:]), flush=True)
        return result
    insp = subprocess.run([*cli(), "inspect", str(out), "--json"], capture_output=True,
                          text=True, env=child_env())
    if insp.returncode != 0:
        result["inspect_error"] = insp.stderr.strip()
    else:
        rep = json.loads(insp.stdout)
        result["inspect"] = rep
        result["components"] = {
            r["component"]: {"settings": r["settings"], "params": r["params"], "bytes": r["bytes"],
                             "mib": r["bytes"] / 2**20, "bits_per_weight": r["bits_per_weight"]}
            for r in rep["components"]}
        result["params"] = rep["params"]
        result["weight_bytes"] = rep["weight_bytes"]
        result["bits_per_weight"] = rep["bits_per_weight"]
    size = tree_bytes(out)
    result["size_bytes"] = size
    result["size_mib"] = size / 2**20
    result["size_mb"] = size / 1e6
    result["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"[{name}] {m['wall_s']:.1f}s wall, peak RSS {m['peak_rss_mib']:.0f} MiB, "
          f"{result['size_mb']:.2f} MB / {result['size_mib']:.2f} MiB", flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report

def target_check(results: list[dict]) -> dict:
    w2 = next((r for r in results if r["name"] == "w2" and "size_bytes" in r), None)
    if w2 is None:
        return {"target": f"W2 artifact <= {TARGET_MB} MB, embeddings/lm_head 4-bit g32",
                "measured": False}
    comps = w2.get("components", {})
    emb_ok = all(comps.get(c, {}).get("settings") == "4-bit g32" for c in ("embeddings", "lm_head"))
    size = w2["size_bytes"]
    return {
        "target": f"W2 artifact <= {TARGET_MB} MB with embeddings/lm_head at 4-bit g32",
        "measured": True,
        "embeddings_lm_head_4bit_g32": emb_ok,
        "size_bytes": size,
        "limit_mb_bytes": TARGET_MB * 10**6,
        "limit_mib_bytes": TARGET_MB * 2**20,
        "pass_mb": emb_ok and size <= TARGET_MB * 10**6,
        "pass_mib": emb_ok and size <= TARGET_MB * 2**20,
        "margin_mb": TARGET_MB - size / 1e6,
        "margin_mib": TARGET_MB - size / 2**20,
    }


def short(settings: str) -> str:
    return settings.replace("-bit ", "b ").replace("float ", "")


def format_tables(results: list[dict], target: dict) -> str:
    lines = []
    hdr = (f"{'config':<12} {'linears':<9} {'emb/lm_head':<11} {'wall s':>7} {'pipe s':>7} "
           f"{'peak RSS MiB':>12} {'size MiB':>9} {'size MB':>8} {'bits/w':>7}")
    lines += [hdr, "-" * len(hdr)]
    for r in results:
        comps = r.get("components", {})
        lin = short(comps.get("language", {}).get("settings", "?"))
        emb = short(comps.get("embeddings", {}).get("settings", "?"))
        if r["rc"] != 0:
            lines.append(f"{r['name']:<12} FAILED rc={r['rc']} (see {r['log']})")
            continue
        lines.append(
            f"{r['name']:<12} {lin:<9} {emb:<11} {r['wall_s']:>7.1f} {r.get('pipeline_s', float('nan')):>7.1f} "
            f"{r['peak_rss_mib']:>12.0f} {r['size_mib']:>9.2f} {r['size_mb']:>8.2f} "
            f"{r.get('bits_per_weight', float('nan')):>7.3f}")
    lines.append("")
    lines.append("bits/weight (MiB) per component  [params: "
                 + ", ".join(f"{c} {v['params'] / 1e6:.1f}M" for c, v in
                             next((r["components"] for r in results if "components" in r), {}).items())
                 + "]")
    hdr2 = f"{'config':<12} " + " ".join(f"{c:>17}" for c in COMPONENTS)
    lines += [hdr2, "-" * len(hdr2)]
    for r in results:
        comps = r.get("components")
        if not comps:
            continue
        cells = []
        for c in COMPONENTS:
            v = comps.get(c)
            cells.append(f"{'-':>17}" if v is None else f"{v['bits_per_weight']:>7.3f} ({v['mib']:>7.2f})")
        lines.append(f"{r['name']:<12} " + " ".join(cells))
    lines.append("")
    if target.get("measured"):
        verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
        lines.append(f"target: {target['target']}")
        lines.append(f"  embeddings/lm_head 4-bit g32: {'yes' if target['embeddings_lm_head_4bit_g32'] else 'NO'}")
        lines.append(f"  380 MB  (380e6 bytes):     {verdict(target['pass_mb'])}  "
                     f"W2 = {target['size_bytes'] / 1e6:.2f} MB, margin {target['margin_mb']:+.2f} MB")
        lines.append(f"  380 MiB (380*2^20 bytes):  {verdict(target['pass_mib'])}  "
                     f"W2 = {target['size_bytes'] / 2**20:.2f} MiB, margin {target['margin_mib']:+.2f} MiB")
    else:
        lines.append(f"target: {target['target']}: not measured (w2 not run or failed)")
    return "\n".join(lines)


def environment() -> dict:
    import mlx.core as mx
    import numpy as np

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = None
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = round(kb / 2**20, 1)
    try:
        import speedq_mlx
        version = speedq_mlx.__version__
    except Exception:
        version = "?"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "mem_gib": mem, "mlx": mx.__version__, "numpy": np.__version__,
            "speedq_mlx": version, "mlx_device": str(mx.default_device()),
            "ld_preload_children": child_env().get("LD_PRELOAD", "")}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="work folder (checkpoint, recipes, artifacts, logs); "
                    "default: a temporary folder")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if present")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                    help="checkpoint weight dtype (numpy has no bfloat16)")
    ap.add_argument("--keep-artifacts", action="store_true", help="keep the exported folders in --work")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._build:
        build_checkpoint(args._build, args.seed, args.dtype)
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    temp = None
    if args.work is None:
        temp = tempfile.mkdtemp(prefix="speedq-rtn-bench-")
        args.work = Path(temp)
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve()

    t_start = time.perf_counter()
    ckpt, build = ensure_checkpoint(work, args.rebuild, args.seed, args.dtype)
    info = checkpoint_info(ckpt)
    print(f"checkpoint: {info['params']:,} params, {info['size_bytes'] / 2**20:.1f} MiB, "
          f"dtypes {info['dtypes']}, vocab {info['vocab_size']}", flush=True)

    results = [run_config(n, ckpt, work, args.keep_artifacts) for n in names]
    target = target_check(results)
    table = format_tables(results, target)
    print("\n" + table)

    out = {"benchmark": "rtn_export", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "environment": environment(), "work": str(work), "checkpoint": info,
           "checkpoint_build": build, "results": results, "target": target,
           "table": table, "total_s": time.perf_counter() - t_start}
    for r in results:  # the inspect blob duplicates "components"; keep the JSON readable
        r.pop("inspect", None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.json}")
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
