"""Conversation records from Hugging Face datasets (hub ids, save_to_disk folders, local
parquet / JSON files), copied once into the user cache and read from there offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import SpeedQError, one_line
from ..model.internvl import IMAGE
from ..model.registry import user_cache
from .records import Record, load_conversations, parse_record

DEFAULT_DATASET = "HuggingFaceH4/llava-instruct-mix-vsft"
DEFAULT_SPLIT = "test"
DEFAULT_LIMIT = 1000
DEFAULT_DATASET_INFO = """\
Default image-instruction data when the user passes neither --data nor --images:
HuggingFaceH4/llava-instruct-mix-vsft (the LLaVA-1.5 instruction mix - COCO, GQA,
OCR-VQA, TextVQA, Visual Genome images with GPT-written conversations - in TRL's
messages format). Licence: CC BY-NC 4.0 (inherited from theblackcat102/llava-instruct-mix;
the images keep their own sources' terms) - fine for calibrating a model, not for
redistributing the data. Size: 259,155 train / 13,640 test rows (~11 GB); we stream the
first DEFAULT_LIMIT (1000) rows of the randomly drawn test split (~50 MB), store them
once under $SPEEDQ_CACHE/datasets (default ~/.cache/speedq-mlx) as a JSONL file plus the
original image files, and read that copy afterwards (offline too)."""


def cache_root() -> Path:
    return user_cache("datasets")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME', 'hf:NAME:SPLIT' or 'hf:NAME:CONFIG:SPLIT' -> (name, config, split)."""
    parts = spec[3:].split(":") if spec.startswith("hf:") else [spec]
    if not parts[0] or len(parts) > 3:
        raise SpeedQError(f"bad dataset spec {spec!r} (use hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT)")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else "train"


def load_hf(spec: str, limit: int | None = None, image_root=None, cache_dir=None) -> list[Record]:
    """Records from a dataset via `datasets`: a hub id, a folder written by save_to_disk,
    or a local parquet/JSON file.

    Rows may be in the InternVL/LLaVA format (`conversations` + `image`), TRL's
    (`messages` + `images`), The Cauldron's (`texts` + `images`) or (image, question,
    answer). The first `limit` rows are copied once into the cache (JSONL + the original
    image bytes) and read from there with load_conversations.
    """
    name, config, split = parse_hf_spec(spec)
    local = Path(name).expanduser()
    out = _hf_copy_dir(spec, limit, cache_dir)
    if not (out / "records.jsonl").is_file():
        base = image_root or (local.parent if local.is_file() else local if local.is_dir() else None)
        _materialize(_hf_rows(name, config, split, local if local.exists() else None), spec, out, limit, base)
    return load_conversations(out / "records.jsonl")


def _hf_copy_dir(spec: str, limit: int | None, cache_dir) -> Path:
    """Where load_hf keeps its copy: keyed by name, config, split and limit (and, for a
    local source, its path, size and modification time)."""
    name, config, split = parse_hf_spec(spec)
    local = Path(name).expanduser()
    key = f"{name}|{config}|{split}|{limit}"
    if local.exists():
        st = local.stat()
        key = f"{local.resolve()}|{st.st_mtime_ns}|{st.st_size}|{config}|{split}|{limit}"
    return Path(cache_dir or cache_root()) / hashlib.sha1(key.encode()).hexdigest()[:16]


def _hf_rows(name: str, config: str | None, split: str, local: Path | None):
    """Streamed rows with images left undecoded (bytes or paths), whatever the source."""
    import datasets

    try:
        if local is not None and local.is_dir() and not any(local.glob("*.parquet")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            ds = ds.to_iterable_dataset()
        elif local is not None and local.is_file():
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(local.suffix)
            if kind is None:
                raise SpeedQError(f"{local}: unknown dataset file type (parquet, json, jsonl, csv)")
            ds = datasets.load_dataset(kind, data_files=str(local), split="train", streaming=True)
        else:
            ds = datasets.load_dataset(str(local or name), config, split=split, streaming=True)
    except SpeedQError:
        raise
    except Exception as e:
        raise SpeedQError(f"cannot load dataset {name}: {one_line(e)}") from None
    return ds.decode(False)


def _materialize(rows, spec: str, out: Path, limit: int | None, base: Path | None) -> None:
    """Write rows as InternVL JSONL + image files into `out`, atomically."""
    from tqdm import tqdm

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with open(tmp / "records.jsonl", "w", encoding="utf-8") as f, \
                tqdm(desc=f"reading {spec}", total=limit, unit="row", file=sys.stderr) as bar:
            for i, row in enumerate(rows):
                if limit is not None and i >= limit:
                    break
                where = f"{spec} row {i}"
                obj = _row_to_conversation(row, where)
                obj["image"] = [_save_image(im, tmp / "images", f"{i:06d}_{k}", where, base)
                                for k, im in enumerate(obj["image"])]
                parse_record(obj, where, tmp)  # every check, naming the row
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                n += 1
                bar.update()
        if n == 0:
            raise SpeedQError(f"{spec}: no rows (empty dataset)")
    except BaseException as e:  # also Ctrl-C: leave no half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SpeedQError) or not isinstance(e, Exception):
            raise
        raise SpeedQError(f"cannot read {spec}: {one_line(e)}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)


def _row_to_conversation(row: dict, where: str) -> dict:
    """One dataset row in any of the supported schemas -> {"conversations", "image"}."""
    ims = row.get("images", row.get("image"))
    ims = [] if ims is None else ims if isinstance(ims, list) else [ims]
    if "conversations" in row:
        return {"conversations": row["conversations"], "image": ims}
    if "messages" in row:
        return {"conversations": [_flatten_message(m) for m in row["messages"]], "image": ims}
    if "texts" in row:
        turns = []
        for t in row["texts"]:
            turns += [{"from": "human", "value": t["user"]}, {"from": "gpt", "value": t["assistant"]}]
        return {"conversations": turns, "image": ims}
    q = next((row[k] for k in ("question", "query", "prompt", "instruction") if row.get(k)), None)
    a = next((row[k] for k in ("answer", "answers", "response", "output") if row.get(k)), None)
    if isinstance(a, list):
        a = a[0] if a else None
    if isinstance(a, dict):
        a = a.get("answer") or a.get("text")
    if not isinstance(q, str) or not isinstance(a, str):
        raise SpeedQError(f"{where}: unknown schema (columns {', '.join(row)}); expected "
                          "conversations, messages, texts, or image/question/answer")
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "image": ims}


def _flatten_message(m: dict) -> dict:
    """TRL/OpenAI message (content a string or typed parts) -> an InternVL turn."""
    content = m.get("content")
    if isinstance(content, list):
        parts = [IMAGE if p.get("type") == "image" else (p.get("text") or "").strip() for p in content]
        content = "\n".join(p for p in parts if p)
    return {"from": m.get("role"), "value": content}


def _save_image(im, folder: Path, stem: str, where: str, base: Path | None) -> str:
    """Write one undecoded dataset image (bytes, a path, or a PIL image) as a file; the
    original bytes are kept, so tiles are the same as from the source."""
    import io

    from PIL import Image, UnidentifiedImageError

    data = None
    if isinstance(im, dict):
        data, im = im.get("bytes"), im.get("path")
    if data is None and isinstance(im, str):
        src = Path(im) if Path(im).is_absolute() or base is None else Path(base) / im
        if not src.is_file():
            raise SpeedQError(f"{where}: image not found: {src}")
        data = src.read_bytes()
    if data is None and hasattr(im, "save"):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    if data is None:
        raise SpeedQError(f"{where}: image column holds {type(im).__name__}, not an image")
    try:
        with Image.open(io.BytesIO(data)) as pil:
            fmt = (pil.format or "png").lower()
    except (UnidentifiedImageError, OSError):
        raise SpeedQError(f"{where}: not a readable image") from None
    name = f"{stem}.{'jpg' if fmt == 'jpeg' else fmt}"
    (folder / name).write_bytes(data)
    return f"images/{name}"


def default_records(limit: int = DEFAULT_LIMIT, cache_dir=None) -> list[Record]:
    """DEFAULT_DATASET (see DEFAULT_DATASET_INFO), downloaded on first use."""
    spec = f"hf:{DEFAULT_DATASET}:{DEFAULT_SPLIT}"
    hint = "pass --data FILE (JSON/JSONL conversations) or --images DIR (images only) instead"
    if not (_hf_copy_dir(spec, limit, cache_dir) / "records.jsonl").is_file():
        flag = next((v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                     if os.environ.get(v, "") not in ("", "0", "false", "False")), None)
        if flag:
            raise SpeedQError(f"no calibration data given and {flag} is set, so the default "
                              f"dataset {DEFAULT_DATASET} cannot be downloaded; {hint}")
    try:
        return load_hf(spec, limit=limit, cache_dir=cache_dir)
    except SpeedQError as e:
        raise SpeedQError(f"cannot get the default dataset {DEFAULT_DATASET} ({e}); {hint}") from None
    except Exception as e:  # connection errors surface while streaming rows
        raise SpeedQError(f"cannot download the default dataset {DEFAULT_DATASET} "
                          f"({one_line(e)}); {hint}") from None
