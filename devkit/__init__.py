"""Development scaffolding, not part of the wheel: builders of the models tests and
benchmarks run on (tiny-shapes training, real-weight SmolLM2 / Qwen2.5 checkpoints),
loopback ports, test helpers. Import it from a clone (the repo root on sys.path)."""

import speedq_mlx  # noqa: F401,E402  (first: a fast BLAS under MLX's Linux CPU build)
