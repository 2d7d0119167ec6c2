"""Benchmark scripts: run from the repo root as `python -m benchmarks.<name>`; each prints a
table and writes JSON under benchmarks/results/."""

import speedq_mlx  # noqa: F401  (first: a fast BLAS under MLX's Linux CPU build, see speedq_mlx/blas.py)
