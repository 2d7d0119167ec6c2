"""The model card (README.md) of an artifact: what is in it, how it was made, how to use
it, and - after `quantize --eval` - the evaluation table. This module is its only author."""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from .inspect import artifact_report, format_report


def write_card(folder: Path, card_info: dict | None = None, eval_table: str | None = None,
               eval_notes: str = "") -> Path:
    """(Re)write folder/README.md from the folder's weights and the run's facts, atomically."""
    folder = Path(folder)
    card = model_card(report_table=format_report(artifact_report(folder)), eval_table=eval_table,
                      eval_notes=eval_notes, **(card_info or {}))
    tmp = folder / f".README.md.tmp-{os.getpid()}"
    tmp.write_text(card)
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"


def model_card(report_table: str, source: str = "?", method: str = "rtn",
               recipe_path: str = "?", stages: str = "-", eval_table: str | None = None,
               eval_notes: str = "") -> str:
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
{evaluation}
## Use
```bash
python -m mlx_vlm.generate --model <this folder> --image photo.jpg --prompt "Describe the image." --max-tokens 100
speedq-mlx chat <this folder> --image photo.jpg   # InternVL's own chat template (ChatML)
```
Note: `mlx_vlm.generate` / `mlx_vlm.chat` render internvl_chat prompts with mlx-vlm's generic
"User: ... Assistant:" template; `speedq-mlx chat` uses the model's trained template, which
this folder also carries in `chat_template.jinja` and `tokenizer_config.json`.
"""
