"""Calibration and training data shared by the SPEED-Q stages.

Sources -> `Record`s (a conversation plus its image files) -> `Sample`s (token ids,
pixel tiles, loss mask) -> padded batches. Prompts are built exactly as InternVL was
trained: the checkpoint's own chat template (config.json "template", e.g. Hermes-2
ChatML with its system prompt) and every `<image>` expanded to
`<img>` + `<IMG_CONTEXT>` * (num_image_token * tiles of that image) + `</img>`, as
mlx-vlm's InternVLChatProcessor does. The loss mask is 1 on the assistant's answer
tokens and the `<|im_end|>` that closes each answer, 0 elsewhere (the losses in
distill.py shift it by one themselves).

Every problem with the user's data is a one-line SpeedQError naming the file and line
(or the dataset row), raised while loading, before any model runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import images as img
from .chat_template import TEMPLATES, render
from .errors import SpeedQError

IMAGE = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}

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


@dataclass
class Record:
    """One conversation: ChatML messages with `<image>` placeholders, and its images in order."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    source: str = ""  # "file:line" for error messages


@dataclass
class Sample:
    """One encoded conversation, ready for collate()."""

    input_ids: list[int]
    loss_mask: list[int]
    pixel_values: mx.array | None  # [n_tiles_total, 3, S, S] or None
    n_tiles: list[int]  # per image, in order
    source: str = ""


@dataclass
class Encoder:
    """What encoding needs from the checkpoint: tokenizer, image tiler, template, token counts."""

    tokenizer: object
    processor: object
    template: str
    num_image_token: int
    image_token_id: int


# ---------------------------------------------------------------- records from files


def load_conversations(path, image_root=None) -> list[Record]:
    """Records from a JSON list or JSONL file in the InternVL/LLaVA conversation format.

    Image paths are relative to `image_root` when given, else to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SpeedQError(f"data file not found: {path}")
    items = _json_items(path)
    if not items:
        raise SpeedQError(f"{path}: no records (empty dataset)")
    from tqdm import tqdm

    base = Path(image_root) if image_root is not None else path.parent
    return [parse_record(obj, f"{path}:{line}", base)
            for line, obj in tqdm(items, desc=f"checking {path.name}", unit="record",
                                  disable=len(items) < 2000, file=sys.stderr)]


def _json_items(path: Path) -> list[tuple[int, object]]:
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
    files = [_check_image(base / p, where) for p in paths]
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


def _check_image(path: Path, where: str) -> Path:
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


# ---------------------------------------------------------------- Hugging Face datasets


def cache_root() -> Path:
    return Path(os.environ.get("SPEEDQ_CACHE", Path.home() / ".cache" / "speedq-mlx")) / "datasets"


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
        raise SpeedQError(f"cannot load dataset {name}: {_first_line(e)}") from None
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
        raise SpeedQError(f"cannot read {spec}: {_first_line(e)}") from None
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
                          f"({_first_line(e)}); {hint}") from None


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


# ---------------------------------------------------------------- text for stage 3


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
        for line, obj in _json_items(path):
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
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
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


# ---------------------------------------------------------------- encoding


def encoder(config: dict, tokenizer, max_tiles: int | None = None) -> Encoder:
    """Everything encode() needs, from the checkpoint's config.json and tokenizer.

    `max_tiles` caps dynamic tiling (the checkpoint's max_dynamic_patch otherwise; 12 for
    InternVL2) - fewer tiles, fewer image tokens and less memory per sample.
    """
    template = config.get("template", "Hermes-2")
    if template not in TEMPLATES:
        raise SpeedQError(f"unknown InternVL chat template {template!r} in config.json "
                          f"(known: {', '.join(TEMPLATES)})")
    size = config.get("force_image_size") or config["vision_config"]["image_size"]
    patch = config["vision_config"].get("patch_size", 14)
    n_tok = int((size // patch) ** 2 * config.get("downsample_ratio", 0.5) ** 2)
    processor = img.image_processor(config)
    if max_tiles is not None:
        processor.dynamic_max_num = max_tiles
    tid = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    if tid is None or tid == tokenizer.unk_token_id:
        raise SpeedQError("tokenizer has no <IMG_CONTEXT> token (not an InternVL tokenizer)")
    return Encoder(tokenizer, processor, template, n_tok, int(tid))


def expand_images(messages: list[dict], n_tiles: list[int], num_image_token: int) -> list[dict]:
    """Each `<image>` in order -> <img><IMG_CONTEXT>*(num_image_token*tiles)</img>."""
    it = iter(n_tiles)
    out = []
    for m in messages:
        pieces = m["content"].split(IMAGE)
        text = pieces[0]
        for p in pieces[1:]:
            text += IMG_START + IMG_CONTEXT * (num_image_token * next(it)) + IMG_END + p
        out.append({**m, "content": text})
    return out


def render_training_text(messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation in the template, and the character spans of each answer
    including its closing `<|im_end|>` (the part the loss is computed on)."""
    text = render(template, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(template, messages[:i], add_generation_prompt=True))
            end = start + len(m["content"]) + len("<|im_end|>")
            if text[start:end] != m["content"] + "<|im_end|>":
                raise AssertionError(f"template {template!r} does not place answers as expected")
            spans.append((start, end))
    return text, spans


def tokenize_with_mask(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a 0/1 mask of the tokens that overlap a character span."""
    tok = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(tok["input_ids"]), tok["offset_mapping"]
    return ids, [int(any(s < e_ and e > s_ for s_, e_ in spans)) for s, e in offsets]


def encode(record: Record, enc: Encoder, max_length: int | None = None) -> Sample | None:
    """Token ids, pixel tiles and loss mask of one record.

    Longer than `max_length`: cut at max_length when every image token is inside;
    otherwise (an image would be cut) None - the caller skips and counts it. Also None
    when no answer token is left after the cut. A token that straddles the start of an
    answer (a BPE merge of the template's newline with an answer that starts with
    whitespace) counts as an answer token: it predicts answer characters.
    """
    pixels = []
    for path in record.images:
        try:
            pixels.append(img.tiles(enc.processor, path))
        except SpeedQError as e:
            raise SpeedQError(f"{record.source}: {e}") from None
    n_tiles = [p.shape[0] for p in pixels]
    messages = expand_images(record.messages, n_tiles, enc.num_image_token)
    text, spans = render_training_text(messages, enc.template)
    ids, mask = tokenize_with_mask(text, spans, enc.tokenizer)
    n_img = ids.count(enc.image_token_id)
    if n_img != enc.num_image_token * sum(n_tiles):
        raise SpeedQError(f"{record.source}: the text already contains {IMG_CONTEXT} tokens")
    if max_length is not None and len(ids) > max_length:
        if n_img and max(i for i, t in enumerate(ids) if t == enc.image_token_id) + 1 >= max_length:
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    pv = mx.concatenate(pixels, axis=0) if pixels else None
    return Sample(ids, mask, pv, n_tiles, record.source)


def iter_samples(records: list[Record], enc: Encoder, max_length: int | None = None,
                 progress: bool = True):
    """encode() each record lazily (pixel tiles are large: a 13-tile InternVL2 image is
    ~31 MB in fp32), skipping - and at the end counting - those that do not fit."""
    from tqdm import tqdm

    skipped = 0
    for r in tqdm(records, desc="encoding", unit="sample", disable=not progress or len(records) < 50,
                  file=sys.stderr):
        s = encode(r, enc, max_length)
        if s is None:
            skipped += 1
        else:
            yield s
    if skipped:
        print(f"skipped {skipped} of {len(records)} samples: image tokens or every answer "
              f"token beyond max_length={max_length}", file=sys.stderr)


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-padded batch: input_ids / attention_mask / loss_mask [B, L] and the tiles of
    every sample concatenated in batch order (the row-major order of the <IMG_CONTEXT>
    tokens in input_ids, so features scatter onto `input_ids == image_token_id`)."""
    L = max(len(s.input_ids) for s in samples)
    pad = [L - len(s.input_ids) for s in samples]
    ids = [s.input_ids + [pad_id] * p for s, p in zip(samples, pad)]
    att = [[1] * len(s.input_ids) + [0] * p for s, p in zip(samples, pad)]
    loss = [s.loss_mask + [0] * p for s, p in zip(samples, pad)]
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    return {
        "input_ids": mx.array(ids, dtype=mx.int32),
        "attention_mask": mx.array(att, dtype=mx.int32),
        "loss_mask": mx.array(loss, dtype=mx.int32),
        "pixel_values": mx.concatenate(pix, axis=0) if pix else None,
        "n_tiles": [s.n_tiles for s in samples],
    }


def batches(records: list[Record], enc: Encoder, batch_size: int, max_length: int | None = None,
            seed: int = 0, progress: bool = True):
    """Collated batches of the records in a seeded order (the last one may be smaller)."""
    pad = enc.tokenizer.pad_token_id if enc.tokenizer.pad_token_id is not None else enc.tokenizer.eos_token_id
    buf = []
    for s in iter_samples(shuffle(records, seed), enc, max_length, progress):
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf, pad)
            buf = []
    if buf:
        yield collate(buf, pad)


# ---------------------------------------------------------------- order and splits


def shuffle(records: list, seed: int) -> list:
    """A seeded permutation (a new list; the same seed gives the same order everywhere)."""
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def split(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): disjoint, seeded; validation gets round(n * fraction) records,
    at least one when the fraction is positive, and train keeps at least one."""
    if not 0 <= val_fraction < 1:
        raise SpeedQError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise SpeedQError(f"{n} record(s) cannot be split into training and validation")
    order = shuffle(records, seed)
    return order[n_val:], order[:n_val]
