"""Plain text for stage 3 and evaluation: documents from files, cut into token windows."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import mlx.core as mx

from ..errors import SpeedQError
from ..model.chat_template import render
from ..model.internvl import IMAGE, separator_token_id
from .records import Record, json_items

def load_text(path) -> list[str]:
    """Documents of plain text for clipping calibration: a .txt file (paragraphs split on
    blank lines), a folder of .txt files, or JSON/JSONL records with a "text" field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SpeedQError(f"no .txt files under {path}")
        docs = [d for f in files for d in load_text(f)]
    elif not path.is_file():
        raise SpeedQError(f"text file not found: {path}")
    elif path.suffix in (".json", ".jsonl"):
        docs = []
        for line, obj in json_items(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SpeedQError(f"{path}:{line}: expected an object with a string 'text'")
            docs.append(obj["text"])
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SpeedQError(f"{path}: no text")
    return docs


def token_windows(texts: list[str], tokenizer, n_tokens: int, n_windows: int | None = None,
                  seed: int = 0) -> mx.array:
    """[n, n_tokens] int32 windows of consecutive tokens: documents in a seeded order,
    joined by the end-of-text token, cut without overlap (the tail is dropped)."""
    from tqdm import tqdm

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = separator_token_id(tokenizer)
    need = None if n_windows is None else n_windows * n_tokens
    ids: list[int] = []
    for i in tqdm(order, desc="tokenizing text", unit="doc", disable=len(order) < 200, file=sys.stderr):
        ids += tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if sep is not None:
            ids.append(sep)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // n_tokens if n_windows is None else min(n_windows, len(ids) // n_tokens)
    if n == 0:
        raise SpeedQError(f"only {len(ids)} tokens of text; need at least {n_tokens} for one window")
    if n_windows is not None and n < n_windows:
        print(f"note: text gives {n} windows of {n_tokens} tokens, fewer than the "
              f"{n_windows} asked for", file=sys.stderr)
    return mx.array(ids[:n * n_tokens], dtype=mx.int32).reshape(n, n_tokens)


def record_texts(records: list[Record], template: str) -> list[str]:
    """Conversations rendered in the chat template without images: calibration text for
    stage 3 when the user gives no --text."""
    return [render(template, [{**m, "content": m["content"].replace(f"{IMAGE}\n", "").replace(IMAGE, "")}
                              for m in r.messages], add_generation_prompt=False) for r in records]
