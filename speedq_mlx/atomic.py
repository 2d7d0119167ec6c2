"""Folders that appear whole or not at all (artifacts, checkpoints)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


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
