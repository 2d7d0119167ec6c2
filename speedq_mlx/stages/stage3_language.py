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

import hashlib
import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import SpeedQError
from ..quant.clip import clip_init
from ..quant.gptq import gptq_init
from ..quant.layers import QuantLinear
from ..quant.plan import select
from ..run import Run, fingerprint
from ..train import distributed as dist
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
        start_latents(run, model, layers, calib_batches, cfg)
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


def start_latents(run: Run, model, layers: dict, calib_batches: list, cfg: StageConfig) -> dict:
    """QAT's start (clip search or GPTQ) on `layers`, computed once and kept in the run folder
    (<start>_init/): a resumed run loads it instead of redoing it (a GPTQ start on a 0.5B
    model takes most of an hour on a laptop CPU). Returns the per-layer stats."""
    name = f"{cfg.start}_init"
    fp = fingerprint([cfg.start, cfg.clip_skip, cfg.clip_tokens, cfg.clip_windows, cfg.learn_qparams,
                      str(run.compute_dtype), str(run.out_dtype)], sorted(layers.items()),
                     batches_digest(calib_batches), upstream_fingerprints(run))
    modules = dict(model.named_modules())
    if run.folder.checkpoint_state(name, fp, f"stage-3 {cfg.start} init", "settings or calibration data"):
        for key, value in run.folder.read_arrays(f"{name}/layers.safetensors").items():
            if key != "_":
                path, attr = key.rsplit(".", 1)
                setattr(modules[path], attr, value)
        run.log(f"stage 3: {cfg.start} init loaded from {run.folder.file(name)}")
        return run.folder.read_json(f"{name}/stats.json")
    init = {"clip": clip_init, "gptq": gptq_init}[cfg.start]
    stats = init(model, layers, cfg.clip_skip, calib_batches, run.image_token, run.compute_dtype,
                 run.out_dtype, run.log)
    weights = {f"{p}.{k}": v for p in stats for k, v in tree_flatten(modules[p].parameters())}
    if dist.is_main():
        with run.folder.atomic(name) as tmp:
            mx.save_safetensors(str(tmp / "layers.safetensors"), weights or {"_": mx.zeros(1)})
            (tmp / "stats.json").write_text(json.dumps(stats))
            (tmp / "state.json").write_text(json.dumps({"fingerprint": fp}))
    run.folder.write_json(f"{name}.json", stats, indent=1)
    return stats


def batches_digest(batches: list) -> str:
    """A hash of calibration batches' tokens and (strided) pixels."""
    h = hashlib.sha256()
    for b in batches:
        h.update(np.asarray(b["input_ids"]).astype(np.int64).tobytes())
        if b.get("pixel_values") is not None:
            pixels = np.asarray(b["pixel_values"].astype(mx.float32)).ravel()
            h.update(str(pixels.shape).encode() + pixels[::97].tobytes())
    return h.hexdigest()[:16]


def upstream_fingerprints(run: Run) -> list:
    """The fingerprints of this run folder's stage 1 and stage 2 checkpoints (what the
    model held when the init ran), None where there is none."""
    return [(run.folder.read_json(f"{name}/state.json") or {}).get("fingerprint")
            for name in ("stage1", "stage2_ckpt")]
