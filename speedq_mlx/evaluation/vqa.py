"""VQA items and their scoring: exact match after a documented normalisation, and
multiple-choice letter extraction for MMBench-style questions.

An item is one JSON object per line (or a JSON list of them):
  {"image": "img/1.jpg" (or a list, or absent for text-only questions),
   "question": "...", "answer": "..." or "answers": ["...", ...],
   "options": {"A": "...", ...} (optional), "match": "exact" | "contains" (optional)}
Image paths are relative to the file's folder (or --image-root). The question is sent
verbatim, so put any instruction ("Answer with the option's letter ...") in it.

Scoring (`score`):
- multiple choice, when the item has options (its "options", or lines "A. ..." / "(B) ..."
  in the question, at least A and B) and its answer is a letter or one option's text:
  the predicted letter (`extract_choice`) must equal the answer's letter;
- otherwise the normalised prediction must equal one normalised answer ("contains":
  contain it as whole words, as OCRBench is scored); an answer "yes"/"no" is matched
  by the prediction's first word, so "Yes, it is." counts.
Normalisation (`normalize`): lowercase; apostrophes dropped; thousands separators in
numbers dropped; every other punctuation mark becomes a space except a decimal point
between digits; articles a/an/the dropped; number words zero..twenty -> digits;
whitespace collapsed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import check_image, json_items
from ..errors import SpeedQError

NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
MATCHES = ("exact", "contains")


@dataclass
class Item:
    question: str
    answers: list[str]
    images: list[Path] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)  # letter -> text; empty: open question
    match: str = "exact"
    source: str = ""


# ---------------------------------------------------------------- normalisation


def normalize(text: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    s = str(text).lower().replace("\u2019", "'").replace("'", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,000 -> 1000
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # keep 3.5, drop sentence periods
    s = re.sub(r"[^\w\s.]|_", " ", s)
    words = [NUMBERS.get(w, w) for w in s.split() if w not in ARTICLES]
    return " ".join(words)


_OPTION_LINE = re.compile(r"^[ \t]*\(?([A-Z])(?:\)|\.|:)[ \t]*(\S.*?)[ \t]*$", re.M)


def parse_options(question: str) -> dict[str, str]:
    """Options listed in a question as lines "A. text", "(B) text", "C: text" or "D) text":
    the run of consecutive letters from A, at least two; {} when there is none."""
    found = {}
    for m in _OPTION_LINE.finditer(question):
        found.setdefault(m.group(1), m.group(2))
    options = {}
    for letter in (chr(ord("A") + i) for i in range(26)):
        if letter not in found:
            break
        options[letter] = found[letter]
    return options if len(options) >= 2 else {}


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form reply picks, or None.

    In order: a reply that starts with a letter ("B", "B.", "(B) ...", "B: ..."); "answer
    is B" / "Answer: (B)" / "option B"; a letter in parentheses; a reply equal to exactly
    one option's text, then containing exactly one option's text; a single distinct option
    letter standing alone ("A" and "I" followed by a lowercase word are read as words).
    """
    p = prediction.strip()
    letters = set(options)
    patterns = (r"^\(?([A-Z])(?:[\.\):,]|\s*$)",
                r"(?i:answer)(?:\s+is|:)?\s*[:\-]?\s*\(?([A-Z])\b",
                r"(?i:option|choice)\s*\(?([A-Z])\b",
                r"\(([A-Z])\)")
    for pattern in patterns:
        m = re.search(pattern, p)
        if m and m.group(1) in letters:
            return m.group(1)
    norm = normalize(p)
    texts = {k: normalize(v) for k, v in options.items()}
    for test in (lambda t: t == norm, lambda t: t and re.search(rf"\b{re.escape(t)}\b", norm)):
        hits = [k for k, t in texts.items() if test(t)]
        if len(hits) == 1:
            return hits[0]
    alone = {m.group(1) for m in re.finditer(r"\b([A-Z])\b(?! [a-z])", p) if m.group(1) in letters}
    alone |= {m.group(1) for m in re.finditer(r"\b([B-HJ-Z])\b", p) if m.group(1) in letters}
    return alone.pop() if len(alone) == 1 else None


def gold_choice(item: Item) -> str | None:
    """The letter an item's answer names: a letter among the options, or one option's text."""
    for ans in item.answers:
        a = ans.strip().strip("().").strip()
        if a in item.options:
            return a
        hits = [k for k, v in item.options.items() if normalize(v) == normalize(ans)]
        if len(hits) == 1:
            return hits[0]
    return None


def score(item: Item, prediction: str) -> dict:
    """{"correct": bool, "kind": "choice" | "exact" | "contains", "extracted": ...}."""
    gold = gold_choice(item) if item.options else None
    if gold is not None:
        picked = extract_choice(prediction, item.options)
        return {"correct": picked == gold, "kind": "choice", "extracted": picked, "gold": gold}
    pred = normalize(prediction)
    golds = [normalize(a) for a in item.answers]
    if item.match == "contains":
        ok = any(g and re.search(rf"(?<!\w){re.escape(g)}(?!\w)", pred) for g in golds)
    else:
        first = pred.split(" ", 1)[0] if pred else ""
        ok = any(pred == g or (g in ("yes", "no") and first == g) for g in golds)
    return {"correct": bool(ok), "kind": item.match, "extracted": pred, "gold": golds}


# ---------------------------------------------------------------- files


def load_items(path, image_root=None, limit: int | None = None) -> list[Item]:
    """Items of a VQA JSON/JSONL file, every image checked before any model runs."""
    path = Path(path)
    if not path.is_file():
        raise SpeedQError(f"VQA file not found: {path}")
    rows = json_items(path)
    if not rows:
        raise SpeedQError(f"{path}: no VQA items (empty file)")
    base = Path(image_root) if image_root is not None else path.parent
    items = [_item(obj, f"{path}:{line}", base) for line, obj in rows[:limit]]
    return items


def _item(obj, where: str, base: Path) -> Item:
    if not isinstance(obj, dict):
        raise SpeedQError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise SpeedQError(f"{where}: missing 'question' (a non-empty string)")
    answers = obj.get("answers", obj.get("answer"))
    answers = [answers] if isinstance(answers, (str, int, float)) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise SpeedQError(f"{where}: needs 'answer' (a string) or 'answers' (a list of strings)")
    answers = [str(a) for a in answers]
    ims = obj.get("image", obj.get("images"))
    ims = [] if ims is None else [ims] if isinstance(ims, str) else ims
    if not isinstance(ims, list) or not all(isinstance(p, str) for p in ims):
        raise SpeedQError(f"{where}: 'image' must be a path or a list of paths")
    images = [check_image(base / p, where) for p in ims]
    n_placeholders = q.count("<image>")
    if n_placeholders and n_placeholders != len(images):
        raise SpeedQError(f"{where}: {n_placeholders} <image> placeholder(s) but {len(images)} image(s)")
    options = obj.get("options")
    if options is None:
        options = parse_options(q)
    elif not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise SpeedQError(f"{where}: 'options' must map letters to option texts")
    match = obj.get("match", "exact")
    if match not in MATCHES:
        raise SpeedQError(f"{where}: 'match' must be one of {', '.join(MATCHES)}")
    return Item(q, answers, images, {str(k).strip().upper(): v for k, v in options.items()}, match, where)


def accuracy(items: list[Item], predict) -> dict:
    """Run `predict(item) -> str` on every item and score it; per-item rows included."""
    from tqdm import tqdm

    rows = []
    for item in tqdm(items, desc="VQA", unit="item", disable=len(items) < 20, file=sys.stderr):
        pred = predict(item)
        rows.append({"source": item.source, "prediction": pred, **score(item, pred)})
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    choice = [r for r in rows if r["kind"] == "choice"]
    return {"items": n, "correct": correct, "accuracy": correct / n if n else None,
            "choice_items": len(choice),
            "choice_unparsed": sum(r["extracted"] is None for r in choice), "rows": rows}
