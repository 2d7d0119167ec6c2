"""A fast BLAS under MLX's Linux CPU build (its bundled reference BLAS is ~20x slower).

libmlx leaves `cblas_sgemm` and LAPACK undefined, so a library loaded with RTLD_GLOBAL
*before* `import mlx.core` provides them (the global scope is searched before libmlx's own
reference BLAS). speedq_mlx/__init__.py calls `use_fast_blas()` first thing, so every
entry point (the CLI, tests, benchmarks, `import speedq_mlx`) gets it. Preference order:
$SPEEDQ_BLAS (a path), the system's OpenBLAS (Debian/Ubuntu/Fedora), then the OpenBLAS that
opencv-python bundles (an mlx-vlm dependency, so present on a fresh machine without apt).
Only libraries that export unprefixed, 32-bit-integer (LP64) CBLAS qualify: MLX passes
`int`s, and numpy's / scipy-openblas' builds are prefixed (and partly ILP64).
Opt out with SPEEDQ_NO_OPENBLAS=1. fp32 matmuls only: fp16/bf16 and quantized matmuls
never use the BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
import time

SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora / RHEL pthread build
    "/usr/lib64/libopenblas.so.0",
)
SLOW_GFLOPS = 8.0  # fp32 512^3: reference BLAS 2-5 GFLOP/s here, OpenBLAS 80-110 (13 with 3 other jobs)
INSTALL_HINT = ("apt-get install libopenblas0-pthread, or pip install opencv-python (its bundled "
                "OpenBLAS is used automatically)")
_loaded: dict = {}


def candidates() -> list[tuple[str, str]]:
    """(kind, path) of the libraries to try, in preference order; only files that exist."""
    out = []
    if os.environ.get("SPEEDQ_BLAS"):
        out.append(("SPEEDQ_BLAS", os.environ["SPEEDQ_BLAS"]))
    out += [("system OpenBLAS", p) for p in SYSTEM_OPENBLAS]
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *(p for p in sys.path if p.endswith("site-packages"))}
    for site in sorted(s for s in sites if os.path.isdir(s)):  # the file name carries a hash
        out += [("opencv-python's OpenBLAS", p)
                for p in sorted(glob.glob(os.path.join(site, "opencv_*.libs", "libopenblas*.so*")))]
    return [(k, p) for k, p in out if os.path.isfile(p)]


def usable(path: str) -> bool:
    """Exports unprefixed cblas_sgemm and is not a 64-bit-integer OpenBLAS build."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        lib.cblas_sgemm  # noqa: B018  (AttributeError when absent or prefixed)
    except (OSError, AttributeError):
        return False
    config = getattr(lib, "openblas_get_config", None)
    if config is not None:
        config.restype = ctypes.c_char_p
        if b"USE64BITINT" in (config() or b""):
            return False
    return True


def use_fast_blas() -> str | None:
    """Load the first usable fast BLAS globally, before mlx.core; returns what was loaded
    (None: not Linux, opted out, mlx already imported, or none found)."""
    if "path" in _loaded:
        return _loaded["path"]
    path = None
    if (sys.platform.startswith("linux") and os.environ.get("SPEEDQ_NO_OPENBLAS", "") in ("", "0")
            and "mlx.core" not in sys.modules):
        for kind, cand in candidates():
            if usable(cand):
                ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
                path = f"{kind}: {cand}"
                break
    _loaded["path"] = path
    return path


def sgemm_gflops(n: int = 512, reps: int = 3) -> float:
    """fp32 matmul speed of MLX on the CPU as it runs now (0.2 s at worst)."""
    import mlx.core as mx

    a = mx.ones((n, n), dtype=mx.float32)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def slow_blas_note() -> str | None:
    """One line for the user when MLX computes with its slow reference BLAS on Linux."""
    import mlx.core as mx

    if (not sys.platform.startswith("linux") or mx.default_device().type == mx.DeviceType.gpu
            or _loaded.get("path")):  # one we loaded: a busy machine's timing would misjudge it
        return None
    speed = sgemm_gflops()
    if speed >= SLOW_GFLOPS:
        return None
    return (f"note: MLX is using its slow reference BLAS here ({speed:.0f} GFLOP/s fp32, ~20x "
            f"slower than OpenBLAS); {INSTALL_HINT}")
