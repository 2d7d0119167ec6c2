#!/usr/bin/env python
"""Size budgets (`quantize --target-size`), measured.

(a) An InternVL2-1B-shaped checkpoint with random weights (built as benchmarks/rtn_export.py
    builds it) quantized with `--method rtn --target-size 315MB` and the registered W2 recipe
    (vision and projector 2-bit g64 stay fixed: no images; the language model, embeddings and
    lm_head are chosen for by sensitivity on the calibration text): is the folder <= 315 MB?
    What it took (wall time, peak RSS). Random weights: size and cost only, no quality.
(b) SmolLM2-135M real weights (devkit/smollm.py) at the uniform W2 recipe
    (benchmarks/recipes/peers-w2.toml: language 2-bit g64, embeddings/lm_head 4-bit g32):
    the budgeted RTN plan at the uniform plan's folder size and at 90%, 87%, 84% of it,
    against the uniform plan, by held-out KL (benchmarks/peers.py's scoring: King James
    Bible windows, full-vocabulary KL against the full-precision model); and the size at
    which the budgeted plan matches uniform W2's KL (interpolated in log KL between the
    sizes measured). The sensitivity is measured once, by the run at the uniform size; the
    smaller plans re-solve the knapsack on that run's plan.json and export with `--plan`.

    python -m benchmarks.budget                  # both parts
    python -m benchmarks.budget --parts b        # SmolLM2 only (~13 min on 2 busy cores)
    python -m benchmarks.budget --parts b --with-speedq   # + SPEED-Q stage 3 on uniform, 100%, 90% (~40 min more)

Writes benchmarks/results/budget.json (parts merged with an existing file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from devkit.texts import DEV_CACHE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "budget.json"
W2_RECIPE = ROOT / "benchmarks" / "recipes" / "peers-w2.toml"
TARGET_A = "315MB"
RATIOS = (1.0, 0.9, 0.87, 0.84)  # of uniform W2's size; SmolLM2's floor (all 2-bit g128) is ~0.83
SPEEDQ_PLANS = ("uniform-w2", "budget-100", "budget-90")  # --with-speedq: uniform, same size, 10% smaller


def quantize_cmd(src: Path, out: Path, *flags) -> list[str]:
    return [sys.executable, "-m", "speedq_mlx", "quantize", "-m", str(src), "-o", str(out), "--overwrite",
            "--run-dir", str(out.parent / "runs" / out.name), *map(str, flags)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def run(cmd: list[str], log: Path) -> dict:
    from benchmarks.peers import run_measured

    res = run_measured(cmd, log)
    if res["rc"] != 0:
        tail = "\n".join(log.read_text().splitlines()[-8:])
        sys.exit(f"failed (rc {res['rc']}): {' '.join(cmd)}\n{tail}")
    return res


# ------------------------------------------------------------------------- (a)

def part_a(work: Path, calib: Path) -> dict:
    from benchmarks.rtn_export import checkpoint_info, ensure_checkpoint
    from speedq_mlx.export.inspect import artifact_report

    ckpt, build = ensure_checkpoint(work, False, 0, "float16")
    out = work / "a-315MB"
    # random weights: the sensitivities mean nothing, so half the default calibration windows
    res = run(quantize_cmd(ckpt, out, "--method", "rtn", "--target-size", TARGET_A, "--text", calib,
                           "--recipe", ROOT / "recipes" / "internvl2-1b-w2.toml", "--sensitivity-windows", 4),
              work / "logs" / "a.log")
    size = folder_bytes(out)
    plan = json.loads((out.parent / "runs" / out.name / "plan.json").read_text())
    rep = artifact_report(out)
    return {"checkpoint": checkpoint_info(ckpt), "build": build, "target": TARGET_A, "size_bytes": size,
            "within_target": size <= 315 * 10**6, "estimate_bytes": plan["budget"]["estimate"],
            "sensitivity": plan["sensitivity"], "lambda": plan["lambda"], **res,
            "components": {c["component"]: {k: c[k] for k in ("settings", "params", "bytes", "bits_per_weight")}
                           for c in rep["components"]}}


# ------------------------------------------------------------------------- (b)

def parse_setting_name(name: str):
    """'2-bit g64' -> (2, 64); 'float' -> None (budget.setting_name's inverse)."""
    if name == "float":
        return None
    bits, group = name.split("-bit g")
    return int(bits), int(group)


def resolve(plan_json: Path, src: Path, size: int, out_plan: Path) -> bool:
    """A plan for `size` bytes from the damages a budgeted run measured (False: out of range)."""
    from speedq_mlx.errors import SpeedQError
    from speedq_mlx.model.io import checkpoint_header, read_config
    from speedq_mlx.quant import budget as B

    doc = json.loads(plan_json.read_text())
    layout = B.layout_from_header(checkpoint_header(src), read_config(src))
    fixed = {p: (m["bits"], m["group_size"]) if m["bits"] else None
             for p, m in doc["modules"].items() if m["fixed"]}
    damages = {p: {parse_setting_name(k): v["damage"] for k, v in m["candidates"].items()}
               for p, m in doc["modules"].items() if not m["fixed"]}
    files = doc["budget"]["support_files_bytes"]
    try:
        allowed = B.check_target(B.Target("size", size, f"{size}"), layout, 2, files, fixed)
    except SpeedQError as e:
        print(f"  skip {size / 1e6:.2f} MB: {e}", flush=True)
        return False
    _, record = B.fit(layout, 2, allowed, fixed, damages)
    out_plan.write_text(json.dumps({"format": "speedq-mlx plan 1", "budget": {"target": f"{size}"}, **record}))
    return True


def crossing(points: list[tuple[float, float]], level: float) -> tuple[float | None, str]:
    """(size where KL(size) reaches `level`, how found): linear in log KL between the measured
    sizes that bracket it ("interpolated"), else along the two nearest ends ("extrapolated")."""
    pts = sorted(points)
    if len(pts) < 2:
        return None, "fewer than two sizes measured"
    pairs = [(a, b) for a, b in zip(pts, pts[1:]) if (a[1] - level) * (b[1] - level) <= 0]
    how = "interpolated" if pairs else "extrapolated"
    if not pairs:
        pairs = [pts[:2]] if level > max(k for _, k in pts) else [pts[-2:]]
    (s0, k0), (s1, k1) = pairs[0]
    if k0 == k1:
        return None, "flat"
    t = (math.log(level) - math.log(k0)) / (math.log(k1) - math.log(k0))
    return s0 + t * (s1 - s0), how


def part_b(work: Path, calib: Path, held: Path, args) -> dict:
    from benchmarks.peers import WORK, checkpoint, held_out_windows, score_all

    src = checkpoint("smollm", WORK)
    work.mkdir(parents=True, exist_ok=True)
    arts, runs = {}, {}
    uniform = work / "uniform-w2"
    runs["uniform-w2"] = run(quantize_cmd(src, uniform, "--method", "rtn", "--recipe", W2_RECIPE), work / "logs" / "uniform.log")
    arts["uniform-w2"] = uniform
    size = folder_bytes(uniform)
    first = work / "budget-100"
    runs["budget-100"] = run(quantize_cmd(src, first, "--method", "rtn", "--recipe", W2_RECIPE, "--target-size",
                                          size, "--text", calib), work / "logs" / "budget-100.log")
    arts["budget-100"] = first
    plan_json = work / "runs" / first.name / "plan.json"
    plan_flags = {"uniform-w2": [], "budget-100": ["--plan", plan_json]}  # each RTN plan, as quantize takes it
    for r in RATIOS[1:]:
        name = f"budget-{round(r * 100)}"
        plan = work / f"{name}.plan.json"
        if resolve(plan_json, src, int(size * r), plan):
            plan_flags[name] = ["--plan", plan]
            runs[name] = run(quantize_cmd(src, work / name, "--method", "rtn", "--recipe", W2_RECIPE, *plan_flags[name]),
                             work / "logs" / f"{name}.log")
            arts[name] = work / name
    if args.with_speedq:  # the same plans through SPEED-Q stage 3
        for base in (b for b in SPEEDQ_PLANS if b in plan_flags):
            name = f"speedq-{base}"
            runs[name] = run(quantize_cmd(src, work / name, "--stages", "3", "--text", calib, "--recipe",
                                          args.speedq_recipe, *plan_flags[base]), work / "logs" / f"{name}.log")
            arts[name] = work / name
    windows = held_out_windows(src, held, args.windows, args.window_tokens)
    print(f"scoring {len(arts)} artifacts on {windows.shape[0]} x {windows.shape[1]} held-out tokens", flush=True)
    scores = score_all(src, arts, windows)
    out = {name: {"size_bytes": folder_bytes(arts[name]), "target_ratio": _ratio(name), **scores[name], **runs[name]}
           for name in arts}
    points = [(m["size_bytes"], m["kl"]) for n, m in out.items() if n.startswith("budget-")]
    match, how = crossing(points, out["uniform-w2"]["kl"])
    return {"model": "SmolLM2-135M-Instruct (InternVL layout, random vision tower)", "uniform_size_bytes": size,
            "windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1]), "held_out": held.name,
            "calibration": calib.name, "artifacts": out, "budget_matches_uniform_kl_at_bytes": match,
            "budget_matches_uniform_kl_how": how,
            "budget_matches_uniform_kl_at_fraction": None if match is None else match / size}


def _ratio(name: str) -> float | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) / 100 if name.startswith("budget-") and tail.isdigit() else None


def table(res: dict) -> str:
    lines = []
    if "a" in res:
        a = res["a"]
        lines += [f"(a) InternVL2-1B-shaped, random: --target-size {a['target']} -> {a['size_bytes'] / 1e6:.2f} MB "
                  f"({'within' if a['within_target'] else 'OVER'}; estimate {a['estimate_bytes'] / 1e6:.2f} MB), "
                  f"{a['wall_s']} s, peak RSS {a['peak_rss_gb']} GB", ""]
        for c, v in a["components"].items():
            lines.append(f"    {c:<11} {v['settings'][:48]:<48} {v['bits_per_weight']:.3f} bits/w")
        lines.append("")
    if "b" in res:
        b = res["b"]
        lines += [f"(b) {b['model']}: held-out {b['windows']} x {b['window_tokens']} tokens of {b['held_out']}", "",
                  "| plan | size MB | of uniform | LM bits/w | KL(fp||q) | top-1 | perplexity | wall s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in sorted(b["artifacts"].items(), key=lambda kv: -kv[1]["size_bytes"]):
            lines.append(f"| {name} | {m['size_bytes'] / 1e6:.2f} | {m['size_bytes'] / b['uniform_size_bytes']:.3f} | "
                         f"{m['lm_bits_per_weight']:.3f} | {m['kl']:.4f} | {m['top1_agreement']:.4f} | "
                         f"{m['ppl_model']:.3f} | {m['wall_s']} |")
        frac = b["budget_matches_uniform_kl_at_fraction"]
        lines += ["", "budgeted RTN matches uniform W2's KL at " + (
            f"{b['budget_matches_uniform_kl_at_bytes'] / 1e6:.2f} MB ({frac:.1%} of uniform W2's size; "
            f"{b.get('budget_matches_uniform_kl_how', '')})" if frac is not None else "? (not found)")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--work", type=Path, default=DEV_CACHE / "budget-bench")
    ap.add_argument("--with-speedq", action="store_true", help="(b): also SPEED-Q stage 3 on the uniform and budgeted plans")
    ap.add_argument("--speedq-recipe", type=Path, default=ROOT / "benchmarks" / "recipes" / "budget-w2-speedq.toml",
                    help="(b) --with-speedq: the stage-3 recipe (default: peers-w2.toml cut to 40 QAT steps)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    from devkit.texts import calibration_text, held_out_text

    calib = calibration_text()
    res = json.loads(args.json.read_text()) if args.json.is_file() else {}
    parts = set(args.parts.split(","))
    t0 = time.time()
    if "a" in parts:
        res["a"] = part_a(args.work / "a", calib)
    if "b" in parts:
        res["b"] = part_b(args.work / "b", calib, held_out_text(), args)
    res["command"] = " ".join(["python -m benchmarks.budget", *sys.argv[1:]])
    res["total_s"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
