"""Shared fixtures: tiny InternVL-layout checkpoints built locally (no network)."""

import os

import numpy as np
import pytest
from PIL import Image

import speedq_mlx  # noqa: F401  (first: loads a fast BLAS before mlx.core, see speedq_mlx/blas.py)
from speedq_mlx.model.synthetic import build_tiny_checkpoint

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny InternVL2-layout HF checkpoint (random weights, locally trained tokenizer)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-internvl", seed=0)


@pytest.fixture(scope="session")
def image_path(tmp_path_factory):
    """A non-square RGB image (exercises dynamic tiling + thumbnail)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((rng.random((80, 120, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="session")
def smollm_ckpt(tmp_path_factory):
    """InternVL-layout checkpoint with the real SmolLM2-135M language model (skip if absent)."""
    from pathlib import Path

    from devkit.smollm import DEFAULT_GGUF, build_smollm_checkpoint

    if not Path(DEFAULT_GGUF).is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {DEFAULT_GGUF}")
    return build_smollm_checkpoint(tmp_path_factory.mktemp("smollm") / "smollm-internvl")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Eight small images of varied sizes and aspect ratios (calibration set)."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        h, w = 40 + 12 * i, 100 - 6 * i
        base = rng.random((1, 1, 3)) * np.linspace(0, 1, w)[None, :, None]  # smooth gradients
        img = np.clip(base + 0.3 * rng.random((h, w, 3)), 0, 1)
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"img{i}.png")
    return folder
