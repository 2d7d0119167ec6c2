"""SPEED-Q stage 2: re-align the projector to the quantized vision tower.

The stage-1 (quantized, frozen) vision tower feeds a trainable float `mlp1` into the
frozen float language model; loss: next-token CE on answers (the authors' code),
optionally plus distillation against the full-precision model (`distill_weight`).
"""

from __future__ import annotations

import mlx.nn as nn

from ..errors import SpeedQError
from ..run import Run
from ..data.sources import TrainData
from .common import StageConfig, enable_grad_checkpoint, train_stage


def unfreeze_projector(model) -> None:
    for layer in model.mlp1:
        if isinstance(layer, nn.Module) and layer.parameters():
            layer.unfreeze()


def run_stage2(run: Run, model, teacher, data: TrainData, cfg: StageConfig) -> dict:
    """Train mlp1 (float) between the quantized ViT and the frozen float language model."""
    if not data.samples:
        raise SpeedQError("stage 2 needs image-text training samples (--data FILE)")
    model.freeze()
    unfreeze_projector(model)
    if cfg.grad_checkpoint:  # the backward pass runs through the whole frozen language model
        enable_grad_checkpoint(model.language_model.model.layers[0])
    return train_stage(run, model, teacher, data, cfg, "stage2")
