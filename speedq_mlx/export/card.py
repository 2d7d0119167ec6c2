"""The model card (README.md) of an artifact: what is in it, how it was made, how to use
it, and - after `quantize --eval` - the evaluation table. This module is its only author."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from .. import __version__
from ..quant.plan import component_of
from .inspect import ORDER, artifact_report, format_report

PLOT_FILE = "bits_per_layer.png"
LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.(.+)$")


def write_card(folder: Path, card_info: dict | None = None, eval_table: str | None = None,
               eval_notes: str = "") -> Path:
    """(Re)write folder/README.md from the folder's weights and the run's facts, atomically."""
    folder = Path(folder)
    info = dict(card_info or {})
    plan = info.pop("plan", None)
    if plan:
        info["plan_section"] = plan_section(plan, info.pop("budget", ""),
                                            plot_bits(plan, folder / PLOT_FILE))
    card = model_card(report_table=format_report(artifact_report(folder)), eval_table=eval_table,
                      eval_notes=eval_notes, **info)
    tmp = folder / f".README.md.tmp-{os.getpid()}"
    tmp.write_text(card)
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"


def model_card(report_table: str, source: str = "?", method: str = "rtn",
               recipe_path: str = "?", stages: str = "-", eval_table: str | None = None,
               eval_notes: str = "", plan_section: str = "") -> str:
    evaluation = f"\n## Evaluation\n{eval_notes}\n\n{eval_table}\n" if eval_table else ""
    return f"""---
library_name: mlx
tags: [mlx, mlx-vlm, internvl, quantized, speedq-mlx]
base_model: {source}
---
# {Path(str(source)).name} - {method.upper()} quantized for MLX

Made with speedq-mlx {__version__} from `{source}`.

- Method: `{method}` (SPEED-Q stages run: {stages})
- Recipe: `{Path(recipe_path).name}`

## What is in it
```
{report_table}
```
{plan_section}{evaluation}
## Use
```bash
python -m mlx_vlm.generate --model <this folder> --image photo.jpg --prompt "Describe the image." --max-tokens 100
speedq-mlx chat <this folder> --image photo.jpg   # InternVL's own chat template (ChatML)
```
Note: `mlx_vlm.generate` / `mlx_vlm.chat` render internvl_chat prompts with mlx-vlm's generic
"User: ... Assistant:" template; `speedq-mlx chat` uses the model's trained template, which
this folder also carries in `chat_template.jinja` and `tokenizer_config.json`.
"""


def short(setting) -> str:
    return "float" if setting is None else f"{setting[0]}/{setting[1]}"


def layer_settings(plan: dict) -> dict:
    """component -> layer index -> module name within the layer -> setting."""
    out: dict = {}
    for path, setting in plan.items():
        m = LAYER.match(path)
        if m:
            out.setdefault(component_of(path), {}).setdefault(int(m.group(2)), {})[m.group(3)] = setting
    return {c: out[c] for c in ORDER if c in out}


def plan_section(plan: dict, budget: str, plot: bool) -> str:
    """Markdown: the settings per component, then bits/group of every module per layer."""
    counts: dict = {}
    for path, setting in plan.items():
        counts.setdefault(component_of(path), Counter())[short(setting)] += 1
    lines = ["", "## Quantization plan", "", budget, "",
             "bits/group per module (`float`: kept in the float dtype); modules per setting:", "",
             "| component | settings (modules) |", "|---|---|"]
    lines += [f"| {c} | " + ", ".join(f"{k} ({n})" for k, n in counts[c].most_common()) + " |"
              for c in ORDER if c in counts]
    for comp, layers in layer_settings(plan).items():
        names = sorted({n for mods in layers.values() for n in mods})
        lines += ["", f"{comp} layers:", "", "| layer | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(short(layers[i][n]) if n in layers[i] else "-"
                                           for n in names) + " |" for i in sorted(layers)]
    if plot:
        lines += ["", f"![bits per layer]({PLOT_FILE})"]
    return "\n".join(lines) + "\n"


def plot_bits(plan: dict, png: Path) -> bool:
    """A small plot of each module's bits per layer (float drawn at 16), one panel per
    component with layers; False when there are no layers to draw."""
    layers = layer_settings(plan)
    if not layers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers), 1, figsize=(6.5, 2.2 * len(layers)), squeeze=False)
    for ax, (comp, per_layer) in zip(axes[:, 0], layers.items()):
        idx = sorted(per_layer)
        for name in sorted({n for mods in per_layer.values() for n in mods}):
            bits = [16 if per_layer[i].get(name) is None else per_layer[i][name][0] for i in idx]
            ax.plot(idx, bits, marker=".", linewidth=0.8, label=name.split(".")[-1])
        ax.set_ylabel(f"{comp} bits")
        ax.set_yticks([2, 3, 4, 6, 8, 16])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(png, dpi=72)
    plt.close(fig)
    return True
