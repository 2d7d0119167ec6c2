"""A fast BLAS under MLX's Linux CPU build, loaded by importing speedq_mlx (blas.py), and the
one-line note when there is none."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speedq_mlx import blas

PROBE = ("import speedq_mlx, numpy as np, mlx.core as mx\n"
         "from speedq_mlx.blas import _loaded, sgemm_gflops, slow_blas_note\n"
         "a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)\n"
         "err = float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a @ a.T).max())\n"
         "print(_loaded['path']); print(round(sgemm_gflops(), 1)); print(err); print(slow_blas_note())\n")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's Linux CPU build only")


def _probe(**env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("SPEEDQ_BLAS", "SPEEDQ_NO_OPENBLAS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return out.strip().splitlines()


def _opencv_openblas() -> str | None:
    import cv2

    libs = glob.glob(str(Path(cv2.__file__).parents[1] / "opencv_*.libs" / "libopenblas*.so*"))
    return libs[0] if libs else None


def test_without_a_fast_blas_the_note_says_what_to_install():
    loaded, speed, err, note = _probe(SPEEDQ_NO_OPENBLAS="1")
    assert loaded == "None" and float(speed) < blas.SLOW_GFLOPS
    assert note.startswith("note: MLX is using its slow reference BLAS") and "apt-get install" in note


def test_opencv_bundled_openblas_is_fast_and_exact():
    """What a fresh machine without apt gets: opencv-python (an mlx-vlm dependency) ships an
    unprefixed LP64 OpenBLAS."""
    lib = _opencv_openblas()
    if lib is None:
        pytest.skip("this opencv-python wheel bundles no OpenBLAS")
    assert blas.usable(lib)
    loaded, speed, err, note = _probe(SPEEDQ_BLAS=lib)
    assert loaded == f"SPEEDQ_BLAS: {lib}"
    assert float(speed) > blas.SLOW_GFLOPS and note == "None"
    assert float(err) < 1e-3  # the same products as numpy's BLAS


def test_prefixed_or_missing_libraries_are_not_used(tmp_path):
    numpy_libs = glob.glob(str(Path(np.__file__).parents[1] / "numpy.libs" / "libscipy_openblas*.so*"))
    for lib in numpy_libs:  # scipy_-prefixed (and ILP64) symbols: MLX could not call them
        assert not blas.usable(lib)
    assert not blas.usable(str(tmp_path / "missing.so"))


def test_the_cli_prints_the_note_once_when_blas_is_slow(tiny_ckpt, tmp_path):
    env = {**os.environ, "SPEEDQ_NO_OPENBLAS": "1"}
    res = subprocess.run([sys.executable, "-m", "speedq_mlx", "quantize", "--method", "rtn", "-m",
                          str(tiny_ckpt), "-b", "4", "-o", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("note: MLX is using its slow reference BLAS") == 1
