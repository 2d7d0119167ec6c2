"""SPEED-Q stage 3: language-model QAT with distillation from the full-precision model.

The pipeline has already swapped every language linear (and the projector's, when the
plan quantizes it) for a fake-quantized `QuantLinear`, and the embeddings / lm_head for
frozen ones at their recipe bits. This stage (1) moves the latent weights to the
asymmetric clipping found on calibration activations (`quant.clip`); (2) trains every
language linear through the shared fake quantizer (STE), the projector still training,
the ViT frozen, embeddings / lm_head frozen; (3) with loss = lambda * CAKLD + zeta * CE per
answer token against the teacher on the same batch, live or from a cached top-k pass.
"""

from __future__ import annotations

from ..errors import SpeedQError
from ..quant.clip import clip_init
from ..quant.gptq import gptq_init
from ..quant.layers import QuantLinear
from ..quant.plan import select
from ..run import Run
from ..data.sources import TrainData
from .common import StageConfig, enable_grad_checkpoint, train_stage
from .stage2_projector import unfreeze_projector
from .teacher import teacher_topk_cache

TRAINED = ("language", "projector")  # the components whose fake-quantized linears QAT trains


def run_stage3(run: Run, model, teacher, plan: dict, data: TrainData, calib_batches: list,
               cfg: StageConfig) -> dict:
    """Clip-init + QAT of the language model, in place."""
    if not data.samples:
        raise SpeedQError("stage 3 needs training samples (--data FILE)")
    run.folder.ensure()
    topk = topk_held_out = None
    if cfg.teacher == "cached" and cfg.distill_weight:
        topk = teacher_topk_cache(teacher, data.samples, cfg.topk, run.folder, run.image_token)
        topk_held_out = teacher_topk_cache(teacher, data.held_out, cfg.topk, run.folder, run.image_token,
                                           "teacher_topk_held_out")
        teacher.release()  # QAT needs only the cached targets
    layers = {p: s for p, s in select(plan, *TRAINED).items() if s is not None}
    if cfg.start != "none":
        init = {"clip": clip_init, "gptq": gptq_init}[cfg.start]
        stats = init(model, layers, cfg.clip_skip, calib_batches, run.image_token, run.compute_dtype,
                     run.out_dtype, run.log)
        run.folder.write_json(f"{cfg.start}_init.json", stats, indent=1)
    model.freeze()
    for p, m in model.named_modules():
        if isinstance(m, QuantLinear) and p.startswith("language_model.model.layers."):
            m.unfreeze()  # latent weight, float bias, and learnable scales/biases if any
            # (embeddings and lm_head stay frozen: quantized once, as the method has it)
            if not cfg.learn_qparams and m.learns_qparams:
                m.freeze(keys=["scales", "biases"])  # GPTQ's grid, kept fixed
    if cfg.train_projector:
        unfreeze_projector(model)
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model.language_model.model.layers[0])
    return train_stage(run, model, teacher, data, cfg, "stage3", (sorted(plan.items()),), topk, topk_held_out)
