"""Peak resident memory of a whole SPEED-Q run on a 0.5B-language-model VLM.

The InternVL2.5-1B-layout checkpoint with the real Qwen2.5-Coder-0.5B language model
(devkit/qwen.py: InternVL2-1B's language-model shape, 630M parameters with the untied head)
goes through `speedq-mlx quantize` with every stage - stage 1 on its (small) vision tower,
stage 2, the GPTQ start and QAT of stage 3 with teacher = "cached" - on photo-sized image
conversations (640x480: 7 tiles, 1792 image tokens each) and text windows, checkpoints and
held-out scoring included, at two steps a stage with a checkpoint and a held-out score after
each (one step on a 1.9k-token photo conversation takes ~6 min here; the peak is set by one
step, checkpoint and scoring, not by how many). Resident memory of the process is sampled
every 0.5 s beside the log line it follows, so the peak phase is named; the peak itself is
the kernel's (wait4). The target is 12 GB (10^9 bytes; a 16 GB Mac).

    python -m benchmarks.memory            # ~45 min on 2 cores; writes results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from devkit.texts import DEV_CACHE

ROOT = Path(__file__).resolve().parents[1]
TARGET_GB = 12.0
RECIPE = """
description = "memory benchmark: every stage, a few steps, checkpoints and held-out scoring"
[quant]
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
max_tiles = 16
iters = 10
batch = 4
[stage2]
steps = 2
batch = 2
lr = 1e-4
checkpoint_every = 1
grad_checkpoint = true
[stage3]
init = "gptq"
clip_windows = 16
clip_tokens = 512
text_windows = 8
text_tokens = 512
steps = 2
batch = 2
lr = 1e-5
checkpoint_every = 1
teacher = "cached"
micro_batch = 1
learn_qparams = true
grad_checkpoint = true
gamma_batches = 2
"""


def photo_conversations(folder: Path, calib_text: Path, n: int = 12) -> Path:
    """n 640x480 images (smooth noise) and one-turn conversations whose answers are ~120
    words of the calibration text."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    words = calib_text.read_text().split()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.random((12, 16, 3))
        Image.fromarray((img * 255).astype("uint8")).resize((640, 480), Image.BILINEAR).save(folder / f"photo{i}.png")
        answer = " ".join(words[i * 120:(i + 1) * 120])
        lines.append(json.dumps({"image": f"photo{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": answer}]}))
    (folder / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "conversations.jsonl"


KIB_TO_GB = 1024 / 1e9  # /proc and ru_maxrss count KiB; GB here is 10^9 bytes


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KIB_TO_GB
    except OSError:
        pass
    return 0.0


def run_sampled(cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    samples, phases, t0 = [], [], time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        done = threading.Event()

        def sample():
            with open(log, errors="replace") as reader:
                while not done.is_set():
                    t = round(time.perf_counter() - t0, 1)
                    lines = [ln.strip() for ln in reader.read().splitlines() if ln.strip()]
                    phases.extend((t, ln) for ln in lines)
                    samples.append((t, round(rss_gb(proc.pid), 3)))
                    done.wait(0.5)

        threading.Thread(target=sample, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(usage.ru_maxrss * KIB_TO_GB, 2), "phase_peaks": phase_peaks(samples, phases),
            "rss_samples": samples}


def phase_peaks(samples: list, phases: list) -> list[dict]:
    """Peak sampled RSS between one log line and the next: which phase of the run peaks."""
    if not phases:
        return []
    starts = [t for t, _ in phases] + [float("inf")]
    peaks = []
    for (start, line), end in zip(phases, starts[1:]):
        rss = [gb for t, gb in samples if start <= t < end]
        if rss:
            peaks.append({"from_s": start, "log_line": line[:160], "peak_gb": max(rss)})
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=DEV_CACHE / "memory-bench")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args()
    from devkit.qwen import qwen_checkpoint
    from devkit.texts import calibration_text

    ckpt, calib = qwen_checkpoint(), calibration_text()
    data = photo_conversations(args.work / "photos", calib)
    recipe = args.work / "recipe.toml"
    recipe.write_text(RECIPE)
    out = args.work / "out"
    cmd = [sys.executable, "-m", "speedq_mlx", "quantize", "-m", str(ckpt), "--recipe", str(recipe),
           "--images", str(data.parent), "--data", str(data), "--text", str(calib), "-o", str(out),
           "--overwrite", "--run-dir", str(args.work / "run")]
    res = run_sampled(cmd, args.work / "quantize.log")
    res.update(command=" ".join(cmd), target_gb=TARGET_GB, target_met=res["rc"] == 0 and res["peak_rss_gb"] <= TARGET_GB,
               model="InternVL2.5-1B layout, Qwen2.5-Coder-0.5B language model (fp32, 630M)",
               log_tail=(args.work / "quantize.log").read_text().splitlines()[-25:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    for row in sorted(res["phase_peaks"], key=lambda r: -r["peak_gb"])[:5]:
        print(f"{row['peak_gb']:6.2f} GB  from {row['from_s']:7.1f} s  after: {row['log_line']}")
    print(f"rc {res['rc']}  wall {res['wall_s']} s  peak RSS {res['peak_rss_gb']} GB "
          f"(target {TARGET_GB} GB: {'met' if res['target_met'] else 'NOT met'})")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
