"""Use Debian's OpenBLAS under MLX's Linux CPU build (its bundled BLAS is ~40x slower).

LD_PRELOAD only works at process start, so the CLI re-executes itself once with it
set. Opt out with SPEEDQ_NO_OPENBLAS=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)


def openblas_path() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    for cand in OPENBLAS_CANDIDATES:
        if Path(cand).is_file():
            return cand
    return None


def reexec_with_openblas(argv: list[str], command: list[str] | None = None) -> None:
    """Replace this process with one that has OpenBLAS preloaded, when that helps.

    `command` is what to run again (default: this CLI, `python -m speedq_mlx`).
    """
    if os.environ.get("SPEEDQ_NO_OPENBLAS", "") not in ("", "0"):
        return
    lib = openblas_path()
    if lib is None or "libopenblas" in os.environ.get("LD_PRELOAD", ""):
        return
    if os.environ.get("_SPEEDQ_REEXEC"):  # never loop
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    env["_SPEEDQ_REEXEC"] = "1"
    command = command or [sys.executable, "-m", "speedq_mlx"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], [*command, *argv], env)
