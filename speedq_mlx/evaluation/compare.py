"""speedq-mlx compare: several quantizations of one model, evaluated on the same inputs,
as a markdown table and a plot of quality against size (what goes in a model card).

A run is "NAME=FLAGS": FLAGS are `speedq-mlx quantize` options (`--method rtn --bits 2`,
`--method speedq --stages 1 --images DIR`, `--recipe ablation.toml`, ...), or
"mlx-vlm:" followed by `mlx_vlm.convert` options (`--q-bits 4 --quant-method awq`) for
mlx-vlm's own quantizers. Every run is checked before the first one starts; each
artifact goes to OUT/NAME and is evaluated against the source model; the source's own
measurements are taken once, with the first run.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpeedQError, one_line
from ..model.io import resolve_source
from .evaluate import EvalOptions, evaluate, load_inputs, write_json

DEFAULT_RUNS = ("w2-rtn=--method rtn --bits 2", "w4-rtn=--method rtn --bits 4")
MLX_VLM = "mlx-vlm:"


@dataclass
class Run:
    name: str
    flags: list[str]
    mlx_vlm: dict | None = None  # mlx_vlm.convert keyword arguments, for mlx-vlm runs

    @property
    def label(self) -> str:
        return (MLX_VLM + " " if self.mlx_vlm is not None else "") + " ".join(self.flags)


def _mlx_vlm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=MLX_VLM, add_help=False, exit_on_error=False)
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--quant-method", choices=("rtn", "awq"), default="rtn")
    p.add_argument("--calibration", choices=("text", "multimodal"), default="text")
    p.add_argument("--calibration-data", default=None)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--quant-predicate", default=None)
    return p


def parse_run(spec: str) -> Run:
    """'NAME=FLAGS' -> Run; mlx-vlm flags are parsed here, quantize flags by `check`."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SpeedQError(f"bad run {spec!r}: use NAME=FLAGS, e.g. \"w2-rtn=--method rtn --bits 2\" "
                          "(NAME: letters, digits, . _ -)")
    flags = flags.strip()
    if flags.startswith(MLX_VLM):
        argv = shlex.split(flags[len(MLX_VLM):])
        try:
            ns, rest = _mlx_vlm_parser().parse_known_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            raise SpeedQError(f"run {name}: bad mlx-vlm option ({e})") from None
        if rest:
            raise SpeedQError(f"run {name}: unsupported mlx-vlm option(s) {' '.join(rest)}")
        return Run(name, argv, vars(ns))
    argv = shlex.split(flags)
    for banned in ("--model", "-m", "--output", "-o"):
        if banned in argv:
            raise SpeedQError(f"run {name}: {banned} is set by compare (--model and OUT/NAME)")
    return Run(name, argv)


def parse_runs(specs: list[str]) -> list[Run]:
    runs = [parse_run(s) for s in (specs or DEFAULT_RUNS)]
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpeedQError(f"run name(s) used twice: {', '.join(dup)}")
    return runs


def mlx_vlm_convert(source: Path, out: Path, kwargs: dict) -> None:
    """mlx-vlm's own converter (RTN or AWQ) into `out`; never runs remote code."""
    from mlx_vlm.convert import convert

    try:
        convert(hf_path=str(source), mlx_path=str(out), quantize=True, trust_remote_code=False, **kwargs)
    except Exception as e:
        raise SpeedQError(f"mlx_vlm.convert failed on {source}: {one_line(e)}") from None


def compare(model: str, runs: list[Run], out_dir: Path, opts: EvalOptions, parse_flags,
            reuse: bool = False, overwrite: bool = False, log=print) -> dict:
    """Quantize (or reuse) and evaluate every run; write compare.md / .json / .png in out_dir.

    `parse_flags(argv)` turns a run's `speedq-mlx quantize` flags into pipeline.QuantizeArgs
    (the CLI's own parser, so runs accept exactly the quantize options); every run is
    parsed and checked before the first one starts.
    """
    from ..pipeline import quantize

    load_inputs(opts)
    source, _ = resolve_source(model)
    out_dir = Path(out_dir)
    planned = {}
    for run in runs:
        dest = out_dir / run.name
        if dest.exists() and not (reuse or overwrite):
            raise SpeedQError(f"{dest} already exists (pass --reuse to evaluate it as is, "
                              "or --overwrite to quantize again)")
        if run.mlx_vlm is None:
            planned[run.name] = _parse(parse_flags, model, run, dest)
    results, ref_side = [], None
    for run in runs:
        dest = out_dir / run.name
        if reuse and (dest / "config.json").is_file():
            log(f"[{run.name}] reusing {dest}")
        elif run.mlx_vlm is not None:
            log(f"[{run.name}] mlx_vlm.convert {' '.join(run.flags)}")
            if dest.exists():
                shutil.rmtree(dest)
            mlx_vlm_convert(source, dest, run.mlx_vlm)
        else:
            log(f"[{run.name}] speedq-mlx quantize {' '.join(run.flags)}")
            quantize(planned[run.name])
        log(f"[{run.name}] evaluating {dest} against {source}")
        res = evaluate(str(dest), str(source), opts, log=log, reference_side=ref_side)
        ref_side = res["reference"]
        write_json(res, out_dir / f"{run.name}.eval.json")
        results.append({"name": run.name, "flags": run.label, **res})
    summary = {"model": str(source), "runs": [_row(r) for r in results],
               "reference": _row({"name": "reference", "flags": str(source), "model": ref_side,
                                  "text": _ref_fidelity(results[0].get("text")),
                                  "data": _ref_fidelity(results[0].get("data"))})}
    write_json(summary, out_dir / "compare.json")
    (out_dir / "compare.md").write_text(markdown(summary))
    plot(summary, out_dir / "compare.png")
    return summary


def _parse(parse_flags, model: str, run: Run, dest: Path):
    argv = ["--model", model, "--output", str(dest), "--overwrite", *run.flags]
    try:
        return parse_flags(argv)
    except SpeedQError as e:
        raise SpeedQError(f"compare run {run.name} ({' '.join(run.flags)}): {e}") from None


def _ref_fidelity(t: dict | None) -> dict | None:
    """The reference against itself: its own perplexity, KL 0, agreement 1."""
    if not t:
        return None
    return {**t, "ppl_model": t["ppl_ref"], "kl": 0.0, "top1_agreement": 1.0}


def _row(r: dict) -> dict:
    m = r["model"]
    text, data = r.get("text") or {}, r.get("data") or {}
    return {"name": r["name"], "flags": r["flags"],
            "size_mb": m["size"]["size_on_disk_bytes"] / 1e6,
            "bits_per_weight": m["size"]["bits_per_weight"],
            "components": {k: v["bits_per_weight"] for k, v in m["components"].items()},
            "vqa_accuracy": (m.get("vqa") or {}).get("accuracy"),
            "text_ppl": text.get("ppl_model"), "text_kl": text.get("kl"),
            "text_top1": text.get("top1_agreement"),
            "answer_ppl": data.get("ppl_model"), "answer_kl": data.get("kl"),
            "answer_top1": data.get("top1_agreement"),
            "generation_tokens_per_s": m["speed"]["generation_tokens_per_s"],
            "peak_memory_mb": m["peak_memory_bytes"] / 1e6}


COLUMNS = (("size_mb", "size MB", ".1f"), ("bits_per_weight", "bits/w", ".3f"),
           ("vqa_accuracy", "VQA acc", ".4f"), ("text_ppl", "text ppl", ".3f"),
           ("text_kl", "text KL", ".4f"), ("text_top1", "text top-1", ".4f"),
           ("answer_ppl", "answer ppl", ".3f"), ("answer_kl", "answer KL", ".4f"),
           ("answer_top1", "answer top-1", ".4f"),
           ("generation_tokens_per_s", "gen tok/s", ".1f"), ("peak_memory_mb", "peak MB", ".0f"))


def markdown(summary: dict) -> str:
    """Runs (reference first) as a markdown table; columns without data are left out."""
    rows = [summary["reference"], *summary["runs"]]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| run | how | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = ["-" if r.get(k) is None else format(r[k], fmt) for k, _, fmt in cols]
        how = "source model" if r is summary["reference"] else f"`{r['flags']}`"
        lines.append(f"| {r['name']} | {how} | " + " | ".join(cells) + " |")
    lines += ["", "KL = mean KL(reference || run) in nats per token; top-1 = share of tokens where "
              "both models' most likely next token is the same; text = --text windows, "
              "answer = answer tokens of --data; speed and peak memory from greedy generation."]
    return "\n".join(lines) + "\n"


PLOTTED = (("vqa_accuracy", "VQA accuracy"), ("answer_kl", "answer-token KL(ref || model), nats"),
           ("text_kl", "text KL(ref || model), nats/token"))


def plot_metrics(summary: dict) -> list[tuple[str, str]]:
    """The quality measures the runs have (VQA accuracy, answer KL, text KL), else bits/weight."""
    found = [m for m in PLOTTED if any(r.get(m[0]) is not None for r in summary["runs"])]
    return found or [("bits_per_weight", "bits per weight")]


def plot(summary: dict, png: Path) -> None:
    """Each quality measure against size on disk: one labelled point per run, a star for
    the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = plot_metrics(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    ref = summary["reference"]
    for ax, (key, label) in zip(axes[0], metrics):
        for r in summary["runs"]:
            if r.get(key) is not None:
                ax.scatter(r["size_mb"], r[key], color="tab:blue")
                ax.annotate(r["name"], (r["size_mb"], r[key]), textcoords="offset points",
                            xytext=(5, 4), fontsize=8)
        if ref.get(key) is not None:
            ax.scatter(ref["size_mb"], ref[key], marker="*", s=140, color="tab:red", label="reference")
            ax.legend(loc="best", fontsize=8)
        if key.endswith("_kl"):
            ax.set_yscale("symlog", linthresh=1e-3)  # KL spans orders of magnitude; the reference is 0
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(summary['model']).name}: quality vs size")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
