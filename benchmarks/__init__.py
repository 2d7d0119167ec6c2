"""Benchmark scripts: run from the repo root as `python -m benchmarks.<name>`; each prints a
table and writes JSON under benchmarks/results/."""
