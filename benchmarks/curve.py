"""Quality against training tokens for the SPEED-Q runs of benchmarks/peers.py.

Every stage-3 run scores its held-out windows (calibration text it does not train on) at
the start (GPTQ init) and at each checkpoint; this reads those scores back from the peers
runs, beside the held-out KJV KL that peers.py measured on the finished artifact, fits a
power law loss = c * tokens^-alpha over the checkpoints, and projects the tokens one
Mac hour buys from FLOPs at an ASSUMED sustained fp32 rate (no Mac here to measure):
8 x language-model matmul params FLOPs per token (student forward + backward, teacher
forward). The projection extrapolates far past the measured tokens, so it is a guide.

    python -m benchmarks.curve      # seconds; reads ~/.cache/speedq-dev/peers-bench, writes results/curve.*
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from .peers import WORK, checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START = re.compile(r"stage3: held-out loss at step 0: ([0-9.]+)")


def run_curve(work: Path, model: str, bits: int, method: str) -> dict | None:
    """[(step, training tokens, held-out loss)] of one peers run, from its log files."""
    folder = work / model / f"w{bits}"
    log = folder / "runs" / method / "stage3_log.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return None  # a run without QAT steps (the GPTQ start alone)
    start = START.search((folder / "logs" / f"{method}.log").read_text(errors="replace").replace("\r", "\n"))
    points, tokens = ([(0, 0, float(start.group(1)))] if start else []), 0
    for r in rows:
        tokens += r["tokens"]
        if "held_out_loss" in r:
            points.append((r["step"], tokens, r["held_out_loss"]))
    tok_s = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    return {"model": model, "bits": bits, "method": method, "points": points, "cpu_tokens_per_s": tok_s}


def fit_power_law(points: list) -> tuple[float, float] | None:
    """Least squares log(loss) = log(c) - alpha * log(tokens) over the points after the start
    (a power law stays positive where a line in log(tokens) crosses zero)."""
    xy = [(math.log(t), math.log(loss)) for _, t, loss in points if t > 0]
    if len(xy) < 2:
        return None
    n = len(xy)
    mean_x, mean_y = sum(x for x, _ in xy) / n, sum(y for _, y in xy) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in xy) / sum((x - mean_x) ** 2 for x, _ in xy)
    return math.exp(mean_y - slope * mean_x), -slope


def lm_matmul_params(llm_config: dict) -> int:
    """Weights a token meets in the language model's matmuls: decoder linears and the head."""
    h, inter, layers = llm_config["hidden_size"], llm_config["intermediate_size"], llm_config["num_hidden_layers"]
    head_dim = llm_config.get("head_dim") or h // llm_config["num_attention_heads"]
    kv = llm_config["num_key_value_heads"] * head_dim
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + llm_config["vocab_size"] * h


def project(curve: dict, matmul_params: int, mac_tflops: float) -> dict:
    """Held-out loss at the tokens one Mac hour buys, and the KJV KL if it keeps its ratio to it."""
    tokens_per_hour = 3600 * mac_tflops * 1e12 / (8 * matmul_params)
    fit = fit_power_law(curve["points"])
    out = {"assumed_mac_tflops": mac_tflops, "lm_matmul_params": matmul_params,
           "mac_tokens_per_hour": round(tokens_per_hour)}
    if fit:
        c, alpha = fit
        loss = c * tokens_per_hour ** -alpha
        ratio = curve["kjv_kl"] / curve["points"][-1][2]
        out.update(fit_c=round(c, 4), fit_alpha=round(alpha, 4), held_out_loss_at_mac_hour=round(loss, 4),
                   kjv_to_held_out_ratio=round(ratio, 3), kjv_kl_at_mac_hour=round(loss * ratio, 4))
    return out


def markdown(curves: list) -> str:
    lines = ["| model | bits | method | step | training tokens | held-out loss | KJV KL (final) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for c in curves:
        for i, (step, tokens, loss) in enumerate(c["points"]):
            kl = f"{c['kjv_kl']:.4f}" if i == len(c["points"]) - 1 and c.get("kjv_kl") is not None else ""
            lines.append(f"| {c['model']} | {c['bits']} | {c['method']} | {step} | {tokens} | {loss:.4f} | {kl} |")
    lines += ["", "| model | bits | method | CPU tok/s | fit alpha | Mac tokens/hour (assumed) | "
              "held-out loss at one Mac hour | KJV KL at one Mac hour (same ratio) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in curves:
        p = c["projection"]
        lines.append(f"| {c['model']} | {c['bits']} | {c['method']} | {c['cpu_tokens_per_s']} | {p.get('fit_alpha', '-')} | "
                     f"{p['mac_tokens_per_hour']:.3g} | {p.get('held_out_loss_at_mac_hour', '-')} | {p.get('kjv_kl_at_mac_hour', '-')} |")
    return "\n".join(lines) + "\n"


def plot(curves: list, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        pts = [(max(t, 100), loss) for _, t, loss in c["points"]]
        ax.plot(*zip(*pts), marker="o", label=f"{c['model']} W{c['bits']} {c['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (start plotted at 100)")
    ax.set_ylabel("held-out loss (forward KL, top-64 teacher)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--peers", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--mac-tflops", type=float, default=10.0, help="ASSUMED sustained fp32 TFLOP/s of a Mac in training")
    ap.add_argument("--json", type=Path, default=RESULTS / "curve.json")
    args = ap.parse_args()
    peers = json.loads(args.peers.read_text())
    curves = []
    for key, r in peers.items():
        for method, m in r["methods"].items():
            if not method.startswith("speedq") or method == "speedq-rtn":
                continue
            c = run_curve(args.work, r["model"], r["bits"], method)
            if c and len(c["points"]) > 1:
                c.update(kjv_kl=m["kl"], kjv_ppl=m["ppl_model"], kjv_top1=m["top1_agreement"])
                config = json.loads((checkpoint(r["model"], args.work) / "config.json").read_text())
                c["projection"] = project(c, lm_matmul_params(config["llm_config"]), args.mac_tflops)
                curves.append(c)
    args.json.write_text(json.dumps(curves, indent=1))
    args.json.with_suffix(".md").write_text(markdown(curves))
    plot(curves, args.json.with_suffix(".png"))
    print(markdown(curves))
    print(f"wrote {args.json}, {args.json.with_suffix('.md')}, {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
