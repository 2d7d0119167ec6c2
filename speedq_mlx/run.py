"""One quantization run: what every stage needs to know (`Run`) and where it keeps its
state (`RunFolder`).

The run folder holds checkpoints, logs, reports and caches. A stage's checkpoint carries
a fingerprint of its settings and data, so `--resume` continues only the run that made
it; every folder is written whole or not at all (`atomic_dir`). Under `mlx.launch`
rank 0 alone reads and writes the folder, and what it reads reaches the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .errors import SpeedQError
from .model import internvl
from .model.io import load_tokenizer, read_config
from .train import distributed as dist


@contextmanager
def atomic_dir(target: Path):
    """Yield an empty temporary folder beside `target`; when the block succeeds it replaces
    `target` by renames, when it fails it is removed and `target` is left as it was."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def fingerprint(*parts) -> str:
    """A short hash of JSON-able settings and data summaries."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class RunFolder:
    """Checkpoints, logs and reports of one run (rank 0 reads and writes them)."""

    path: Path
    resume: bool = False

    def __post_init__(self):
        self.path = Path(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def ensure(self) -> None:
        if dist.is_main():
            self.path.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        """Whether `name` exists (rank 0's answer, on every rank)."""
        return bool(dist.broadcast_json(self.file(name).exists() if dist.is_main() else None))

    def read_json(self, name: str):
        """The JSON file `name`, or None when it is missing (rank 0 reads, all ranks get it)."""
        path = self.file(name)
        return dist.broadcast_json(json.loads(path.read_text())
                                   if dist.is_main() and path.is_file() else None)

    def write_json(self, name: str, obj, indent: int | None = None) -> None:
        if dist.is_main():
            self.ensure()
            self.file(name).write_text(json.dumps(obj, indent=indent))

    def read_arrays(self, name: str) -> dict:
        """A safetensors file of the folder on every rank."""
        return dist.broadcast_arrays(mx.load(str(self.file(name))) if dist.is_main() else None)

    def atomic(self, name: str):
        """atomic_dir for a checkpoint folder inside the run folder."""
        return atomic_dir(self.file(name))

    def checkpoint_state(self, name: str, fp: str, what: str, inputs: str) -> dict | None:
        """The state.json of checkpoint folder `name` when there is one to resume, else None.

        A checkpoint from another run is never continued or silently replaced: without
        --resume, or with another fingerprint, the run stops with a one-line error."""
        dist.check_same(fp, f"{what} {inputs}")
        state = self.read_json(f"{name}/state.json")
        if state is None:
            return None
        where = self.file(name)
        if not self.resume:
            raise SpeedQError(f"{where} holds a {what} checkpoint; pass --resume to continue it, "
                              "or --overwrite to start again")
        if state.get("fingerprint", "") != fp:
            raise SpeedQError(f"{where} was made with other {what} {inputs}; "
                              "use another --run-dir or --overwrite")
        return state


@dataclass
class Run:
    """What the stages share: the source checkpoint, its tokenizer and token ids, dtypes,
    the run folder and the log."""

    source: Path
    config: dict
    tokenizer: object
    image_token: int
    pad_id: int
    compute_dtype: object = mx.float32
    out_dtype: object = mx.float16
    folder: RunFolder = field(default_factory=lambda: RunFolder(Path("runs")))
    seed: int = 0
    log: Callable = print

    @classmethod
    def open(cls, source: Path, run_dir: Path, resume: bool = False, **kw) -> "Run":
        """A Run for a checkpoint folder: config, tokenizer and ids read from it."""
        tokenizer = load_tokenizer(source)
        return cls(source=Path(source), config=read_config(source), tokenizer=tokenizer,
                   image_token=internvl.image_token_id(tokenizer),
                   pad_id=internvl.pad_token_id(tokenizer),
                   folder=RunFolder(run_dir, resume), **kw)
