"""Conversation records from the user's files: the InternVL/LLaVA JSON / JSONL format,
checked line by line.

A record is a conversation (ChatML roles, `<image>` placeholders in the human turns) and
its image files in order. Every problem is a one-line SpeedQError naming the file and
line (or the dataset row), raised while loading, before any model runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpeedQError
from ..model.internvl import IMAGE

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


@dataclass
class Record:
    """One conversation: ChatML messages with `<image>` placeholders, and its images in order."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    source: str = ""  # "file:line" for error messages




def load_conversations(path, image_root=None) -> list[Record]:
    """Records from a JSON list or JSONL file in the InternVL/LLaVA conversation format.

    Image paths are relative to `image_root` when given, else to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SpeedQError(f"data file not found: {path}")
    items = json_items(path)
    if not items:
        raise SpeedQError(f"{path}: no records (empty dataset)")
    from tqdm import tqdm

    base = Path(image_root) if image_root is not None else path.parent
    return [parse_record(obj, f"{path}:{line}", base)
            for line, obj in tqdm(items, desc=f"checking {path.name}", unit="record",
                                  disable=len(items) < 2000, file=sys.stderr)]


def json_items(path: Path) -> list[tuple[int, object]]:
    """(line, object) pairs of a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    return _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)


def _json_lines(text: str, path: Path) -> list[tuple[int, object]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise SpeedQError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    return out


def _json_array(text: str, path: Path) -> list[tuple[int, object]]:
    """Items of a top-level JSON list with the line each starts on (json.loads gives none)."""
    dec, out = json.JSONDecoder(), []
    i, line, last = text.index("[") + 1, 1, 0

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        i = skip(i)
        line += text.count("\n", last, i)
        last = i
        if text[i:i + 1] == "]" and not out:
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise SpeedQError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        out.append((line, obj))
        i = skip(i)
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] == "]":
            break
        else:
            raise SpeedQError(f"{path}:{line + text.count(chr(10), last, i)}: malformed JSON "
                              "(expected ',' or ']' after a record)")
    if text[i + 1:].strip():
        raise SpeedQError(f"{path}: malformed JSON (text after the closing ']')")
    return out


def parse_record(obj, where: str, base: Path) -> Record:
    """Check one InternVL/LLaVA record and turn it into a Record (errors name `where`)."""
    if not isinstance(obj, dict):
        raise SpeedQError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SpeedQError(f"{where}: missing or empty 'conversations' list")
    messages = [_turn(t, where) for t in conv]
    _check_roles(messages, where)
    paths = obj.get("image", obj.get("images"))
    paths = [] if paths is None else [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise SpeedQError(f"{where}: 'image' must be a path or a list of paths")
    files = [check_image(base / p, where) for p in paths]
    messages = _place_images(messages, len(files), where)
    return Record(messages, files, where)


def _turn(t, where: str) -> dict:
    if not isinstance(t, dict):
        raise SpeedQError(f"{where}: each conversation turn must be an object")
    role = ROLES.get(str(t.get("from", t.get("role"))).lower())
    value = t.get("value", t.get("content"))
    if role is None or not isinstance(value, str):
        raise SpeedQError(f"{where}: a turn needs 'from' (human/gpt/system) and a string 'value'")
    return {"role": role, "content": value}


def _check_roles(messages: list[dict], where: str) -> None:
    """An optional system turn, then user/assistant alternating, every question answered."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or len(turns) % 2 or [m["role"] for m in turns] != expected[:len(turns)]:
        raise SpeedQError(f"{where}: turns must alternate human, gpt, ... and end with a gpt answer")
    if any(IMAGE in m["content"] for m in messages if m["role"] != "user"):
        raise SpeedQError(f"{where}: {IMAGE} may appear only in human turns")


def _place_images(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Check `<image>` placeholders against the images; none at all means "before the
    first question" (what InternVL's training code and mlx-vlm's processor do)."""
    count = sum(m["content"].count(IMAGE) for m in messages)
    if count == 0 and n_images:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = f"{IMAGE}\n" * n_images + messages[first]["content"]
    elif count != n_images:
        raise SpeedQError(f"{where}: {count} {IMAGE} placeholder(s) but {n_images} image(s)")
    return messages


def check_image(path: Path, where: str) -> Path:
    """The file exists and its header is an image (decoding happens when it is tiled)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SpeedQError(f"{where}: image not found: {path}")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError):
        raise SpeedQError(f"{where}: not a readable image: {path}") from None
    return path
