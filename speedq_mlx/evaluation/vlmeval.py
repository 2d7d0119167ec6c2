"""VLMEvalKit benchmark TSV files -> a VQA JSONL for `speedq-mlx eval --vqa`.

VLMEvalKit ships every image benchmark as one TSV (MMBench_DEV_EN.tsv, MMStar.tsv,
ScienceQA_TEST.tsv, AI2D_TEST.tsv, SEEDBench_IMG.tsv, MMMU_DEV_VAL.tsv, OCRBench.tsv,
HallusionBench.tsv, ...): columns index, image (base64; a list of them for several
images; or, to save space, the index of another row with the same image), question,
optional hint, options A, B, C, ..., answer. This writes the images as files and one
item per row, prompted the way VLMEvalKit prompts InternVL:
- multiple choice (option columns present): "Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\n
  Answer with the option's letter from the given choices directly.";
- yes/no (every answer yes or no): the question + "\\nPlease answer yes or no.";
- open (others): the question + "\\nAnswer the question using a single word or phrase.";
  an answer that is a list ("['a', 'b']", as in OCRBench) is matched by containment.

    python -m speedq_mlx.evaluation.vlmeval MMBench_DEV_EN.tsv bench/mmbench [--limit 200]
    speedq-mlx eval MODEL -r REF --vqa bench/mmbench/items.jsonl
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import json
import string
import sys
from pathlib import Path

from ..errors import SpeedQError

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
YN_SUFFIX = "Please answer yes or no."
VQA_SUFFIX = "Answer the question using a single word or phrase."


def _cell(row: dict, key: str) -> str | None:
    v = row.get(key)
    return None if v is None or v.strip() in ("", "nan", "NaN", "None") else v


def _as_list(v: str) -> list[str]:
    """A cell that may hold a Python list literal ("['a', 'b']") -> its strings."""
    s = v.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            out = ast.literal_eval(s)
            if isinstance(out, list):
                return [str(x) for x in out]
        except (ValueError, SyntaxError):
            pass
    return [v]


def read_tsv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SpeedQError(f"TSV file not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise SpeedQError(f"{path}: no rows")
    for need in ("index", "question"):
        if need not in rows[0]:
            raise SpeedQError(f"{path}: no '{need}' column (not a VLMEvalKit TSV)")
    return rows


def write_images(row: dict, by_index: dict, out: Path, where: str) -> list[str]:
    """The row's images as files under out/images; paths relative to out."""
    cell = _cell(row, "image")
    if cell is None:
        return []
    if len(cell) <= 64:  # the index of a row that holds the image
        ref = by_index.get(cell.strip())
        if ref is None or _cell(ref, "image") is None or len(_cell(ref, "image")) <= 64:
            raise SpeedQError(f"{where}: image refers to row {cell!r}, which has no image")
        cell = _cell(ref, "image")
    names = []
    for k, b64 in enumerate(_as_list(cell)):
        name = f"images/{row['index']}{'' if k == 0 else f'_{k}'}.jpg"
        try:
            data = base64.b64decode(b64, validate=False)
        except ValueError:
            raise SpeedQError(f"{where}: image is not base64") from None
        (out / name).write_bytes(data)
        names.append(name)
    return names


def to_item(row: dict, images: list[str]) -> dict:
    """One VQA item (see vqa.py) with VLMEvalKit's prompt for InternVL."""
    question = row["question"].strip()
    answer = _cell(row, "answer")
    options = {c: _cell(row, c).strip() for c in string.ascii_uppercase if _cell(row, c) is not None}
    item = {"index": row["index"], "image": images}
    if _cell(row, "category"):
        item["category"] = row["category"]
    if options:
        hint = _cell(row, "hint")
        text = (f"Hint: {hint.strip()}\n" if hint else "") + f"Question: {question}\nOptions:\n"
        text += "".join(f"{k}. {v}\n" for k, v in options.items()) + MC_SUFFIX
        item.update(question=text, options=options)
    elif answer is not None and answer.strip().lower() in ("yes", "no"):
        item["question"] = f"{question}\n{YN_SUFFIX}"
    else:
        item["question"] = f"{question}\n{VQA_SUFFIX}"
    if answer is not None:
        answers = _as_list(answer)
        item["answers"] = answers
        if len(answers) > 1 or answer.strip().startswith("["):
            item["match"] = "contains"
    return item


def convert(tsv: Path, out: Path, limit: int | None = None) -> Path:
    """Write out/items.jsonl and out/images/ from a VLMEvalKit TSV; rows without an
    answer (test splits) are skipped."""
    rows = read_tsv(tsv)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    by_index = {r["index"].strip(): r for r in rows}
    n = skipped = 0
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        for line, row in enumerate(rows, 2):
            if limit is not None and n >= limit:
                break
            if _cell(row, "answer") is None:
                skipped += 1
                continue
            item = to_item(row, write_images(row, by_index, out, f"{tsv}:{line}"))
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            n += 1
    if not n:
        raise SpeedQError(f"{tsv}: no rows with an answer (a test split?)")
    if skipped:
        print(f"skipped {skipped} rows without an answer", file=sys.stderr)
    print(f"wrote {n} items to {out / 'items.jsonl'}", file=sys.stderr)
    return out / "items.jsonl"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m speedq_mlx.evaluation.vlmeval", description=__doc__.split("\n")[0])
    p.add_argument("tsv", type=Path, help="VLMEvalKit benchmark TSV")
    p.add_argument("out", type=Path, help="folder for items.jsonl and images/")
    p.add_argument("--limit", type=int, default=None, help="convert the first N answered rows")
    a = p.parse_args(argv)
    try:
        convert(a.tsv, a.out, a.limit)
    except SpeedQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
