"""SPEED-Q stages 2 and 3: projector re-alignment, then language-model QAT with distillation.

Stage 2: the stage-1 (quantized, frozen) vision tower feeds a trainable float `mlp1`
into the frozen float language model; next-token CE on answers, optionally plus a
distillation term against the full-precision model.

Stage 3: (1) asymmetric clipping initialisation of the language linears on
calibration activations (`clip_init`); (2) QAT of every language linear through the
shared fake quantizer (STE), the projector still training in float, the ViT frozen,
embeddings / lm_head frozen at their recipe bits; (3) loss = lambda * CAKLD + zeta * CE
per answer token against the full-precision teacher on the same batch, live or from a
cached top-k pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import data
from . import distill as D
from . import distributed as dist
from .clip_init import clip_weight, gram_blocks, search_clip
from .errors import SpeedQError
from .forward import logits as vlm_logits
from .qlayers import QuantLinear
from .train_loop import TrainConfig, grad_checkpoint, train

STAGE_KEYS = ("distill", "distill_weight", "ce_weight", "label_smoothing", "gamma_batches",
              "teacher", "topk", "learn_qparams", "clip_init", "clip_skip",
              "train_projector", "grad_checkpoint", "clip_tokens", "clip_windows")


@dataclass
class StageConfig:
    train: TrainConfig
    distill: str = "cakld"            # cakld | forward | reverse
    distill_weight: float = 1.0       # lambda (0 turns distillation off)
    ce_weight: float = 1.0            # zeta (0 turns CE off)
    label_smoothing: float = 0.0
    gamma_batches: int = 8            # batches whose teacher top-1 mean is CAKLD's gamma
    teacher: str = "live"             # live | cached (top-k logits on disk)
    topk: int = 64
    learn_qparams: bool = False       # learn scales/biases, or recompute min/max each step
    clip_init: bool = True
    clip_skip: list = field(default_factory=lambda: ["q_proj", "k_proj"])
    clip_tokens: int = 512            # calibration text window length (paper: 128 x 512)
    clip_windows: int = 128
    train_projector: bool = True
    grad_checkpoint: bool = False

    @classmethod
    def from_recipe(cls, recipe: dict, name: str, **defaults) -> "StageConfig":
        section = dict(recipe.get(name, {}))
        train_cfg = TrainConfig.from_section(section, name, extra=STAGE_KEYS)
        own = {k: section[k] for k in STAGE_KEYS if k in section}
        cfg = cls(train=train_cfg, **{**defaults, **own})
        if cfg.teacher not in ("live", "cached"):
            raise SpeedQError(f"recipe [{name}] teacher must be 'live' or 'cached', got {cfg.teacher!r}")
        if cfg.distill not in ("cakld", "forward", "reverse"):
            raise SpeedQError(f"recipe [{name}] distill must be cakld, forward or reverse")
        return cfg


def collate(samples: list, pad_id: int, topk: list | None = None) -> dict:
    """data.collate, plus the cached teacher top-k of each sample padded to the batch."""
    batch = data.collate(samples, pad_id)
    if topk is not None:
        L = batch["input_ids"].shape[1]
        batch["teacher"] = (mx.stack([_pad_rows(t[0], L, 0) for t in topk]),
                            mx.stack([_pad_rows(t[1], L, -1e4) for t in topk]))
    return batch


def _pad_rows(a: mx.array, length: int, value) -> mx.array:
    if a.shape[0] == length:
        return a
    pad = mx.full((length - a.shape[0], a.shape[1]), value, dtype=a.dtype)
    return mx.concatenate([a, pad], axis=0)


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def samples_fingerprint(samples: list) -> list:
    return [sum(s.input_ids) % 1000003 for s in samples] + [len(samples)]


# ---------------------------------------------------------------- teacher

def teacher_topk_cache(teacher, samples: list, k: int, cache_dir: Path, image_token: int) -> list:
    """First pass: the teacher's top-k (indices, log-probs) per sample, saved to disk, so
    the teacher need not stay in memory; a re-run (resume) reads the files instead.

    Under a launcher the missing samples are split over the ranks; every rank ends with
    all of them in memory and rank 0 alone writes (and reads) the files."""
    if dist.size() > 1:
        return _teacher_topk_distributed(teacher, samples, k, cache_dir, image_token)
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(samples)) if not (cache_dir / f"{i}.safetensors").is_file()]
    for i in tqdm(todo, desc="teacher top-k", unit="sample", disable=not todo):
        s = samples[i]
        lg = vlm_logits(teacher, mx.array([s.input_ids]), s.pixel_values, image_token)
        idx, lp = D.teacher_topk(lg[0], k)
        mx.save_safetensors(str(cache_dir / f"{i}.safetensors"),
                            {"idx": idx, "logp": lp.astype(mx.float32)})
    out = []
    for i in range(len(samples)):
        t = mx.load(str(cache_dir / f"{i}.safetensors"))
        out.append((t["idx"], t["logp"]))
    return out


def _teacher_topk_distributed(teacher, samples: list, k: int, cache_dir: Path,
                              image_token: int) -> list:
    from tqdm import tqdm

    main = dist.is_main()
    if main:
        cache_dir.mkdir(parents=True, exist_ok=True)
    todo = dist.broadcast_json([i for i in range(len(samples))
                                if not (cache_dir / f"{i}.safetensors").is_file()] if main else None)
    mine = set(todo[dist.rank()::dist.size()])
    local = {}
    for i in tqdm(sorted(mine), desc="teacher top-k", unit="sample", disable=not (todo and main)):
        s = samples[i]
        lg = vlm_logits(teacher, mx.array([s.input_ids]), s.pixel_values, image_token)
        idx, lp = D.teacher_topk(lg[0], k)
        local[i] = (idx, lp.astype(mx.float32))
        mx.eval(local[i])
    out = []
    todo_set = set(todo)
    for pos, i in enumerate(todo):  # share each new entry from the rank that computed it
        n = len(samples[i].input_ids)
        mine_i = local.get(i, (mx.zeros((n, k), dtype=mx.int32), mx.zeros((n, k), dtype=mx.float32)))
        idx, lp = dist.broadcast_from(pos % dist.size(), list(mine_i))
        local[i] = (idx, lp)
        if main:
            mx.save_safetensors(str(cache_dir / f"{i}.safetensors"), {"idx": idx, "logp": lp})
    for i in range(len(samples)):
        if i in todo_set:
            out.append(local[i])
        else:  # cached by an earlier run: rank 0 reads, the others receive
            t = dist.broadcast_arrays(mx.load(str(cache_dir / f"{i}.safetensors")) if main else None)
            out.append((t["idx"], t["logp"]))
    return out


def estimate_gamma(teacher, get_batch, n_batches: int, image_token: int) -> float:
    """CAKLD's gamma: the teacher's mean top-1 probability on answer tokens (under a
    launcher, of every rank's shard of the first n_batches batches)."""
    total = count = 0.0
    for step in range(n_batches):
        b = get_batch(step)
        t = b.get("teacher")
        if t is None:
            t = vlm_logits(teacher, b["input_ids"], b["pixel_values"], image_token)
        s, n = D.teacher_confidence(t, b["input_ids"], b["loss_mask"])
        total, count = total + s, count + n
    total, count = dist.sum_floats(total, count) if dist.size() > 1 else (total, count)
    return total / max(count, 1.0)


# ---------------------------------------------------------------- clipping init

class _GramRecorder(nn.Module):
    """Stands in for a linear during calibration and accumulates X^T X group blocks."""

    def __init__(self, inner, group_size):
        super().__init__()
        self.inner = inner
        self.group_size = group_size
        self.gram = None

    def __call__(self, x):
        g = gram_blocks(x, self.group_size)
        self.gram = g if self.gram is None else self.gram + g
        mx.eval(self.gram)
        return self.inner(x)


def calibration_grams(model, targets: dict, batches: list, image_token: int) -> dict:
    """path -> gram blocks of each target linear's inputs over the calibration batches.

    Under a launcher each rank runs its contiguous share of the batches and the Gram
    blocks (sums of X^T X) are all-summed."""
    modules = dict(model.named_modules())
    recorders = {p: _GramRecorder(modules[p], g) for p, (_, g) in targets.items()}
    lo, hi = dist.shard_range(len(batches))
    _swap(model, recorders)
    try:
        for b in batches[lo:hi]:
            mx.eval(vlm_logits(model, b["input_ids"], b["pixel_values"], image_token))
    finally:
        _swap(model, {p: r.inner for p, r in recorders.items()})
    if dist.size() == 1:
        return {p: r.gram for p, r in recorders.items()}
    out = {}
    for p, r in sorted(recorders.items()):
        if r.gram is None:  # no batch on this rank
            w_in, g = modules[p].weight.shape[1], targets[p][1]
            r.gram = mx.zeros((w_in // g, g, g), dtype=mx.float32)
        out[p] = dist.all_sum(r.gram)
        mx.eval(out[p])
    return out


def _swap(model, new_modules: dict) -> None:
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten(list(new_modules.items())))


def quantize_language(model, plan: dict, cfg: StageConfig, calib_batches: list, image_token: int,
                      scale_dtype, log=print) -> dict:
    """Replace the language linears with QuantLinear, clip-initialised; returns search stats."""
    targets = {p: s for p, s in plan.items() if s is not None and (
        (p.startswith("language_model.") and p != "language_model.lm_head"
         and not p.endswith("embed_tokens")) or p.startswith("mlp1."))}
    clip_targets = {p: s for p, s in targets.items() if cfg.clip_init and p.startswith("language_model.")
                    and p.rsplit(".", 1)[-1] not in cfg.clip_skip}
    grams = calibration_grams(model, clip_targets, calib_batches, image_token) if clip_targets else {}
    modules = dict(model.named_modules())
    new, stats = {}, {}
    searched = _split_clip_search(modules, grams, clip_targets, scale_dtype) if dist.size() > 1 else {}
    from tqdm import tqdm

    for p, (bits, group) in tqdm(sorted(targets.items()), desc="clip init", unit="layer",
                                 disable=not clip_targets or dist.size() > 1):
        lin = modules[p]
        w = lin.weight
        if p in grams:
            s, b, st = searched[p] if p in searched else search_clip(w, grams[p], bits, group, scale_dtype)
            stats[p] = st
            w = clip_weight(w, s, b, bits, group)
            kw = {"scales": s, "biases": b} if cfg.learn_qparams else {}
        else:
            kw = {"learn_qparams": cfg.learn_qparams}
        # latent weights stay fp32 whatever the compute dtype (QuantLinear casts at use)
        new[p] = QuantLinear(w.astype(mx.float32), lin.get("bias"), bits=bits, group_size=group,
                             scale_dtype=scale_dtype, **kw)
    _swap(model, new)
    if stats:
        rtn = sum(v["rtn_error"] for v in stats.values())
        clip = sum(v["clip_error"] for v in stats.values())
        log(f"clip init: {len(stats)} layers, calibration output error {rtn:.4g} -> {clip:.4g}")
    return stats


def _split_clip_search(modules: dict, grams: dict, clip_targets: dict, scale_dtype) -> dict:
    """Under a launcher: rank r searches every W-th layer; the results are shared."""
    from tqdm import tqdm

    paths = sorted(grams)
    W, r = dist.size(), dist.rank()
    local = {}
    for p in tqdm(paths[r::W], desc="clip init", unit="layer", disable=not dist.is_main()):
        bits, group = clip_targets[p]
        s, b, st = search_clip(modules[p].weight, grams[p], bits, group, scale_dtype)
        local[p] = (s.astype(mx.float32), b.astype(mx.float32),  # float32 already: scale_dtype
                    mx.array([st["rtn_error"], st["clip_error"]], dtype=mx.float32))  # only rounds
        mx.eval(local[p])
    out = {}
    for i, p in enumerate(paths):
        owner = i % W
        if p in local:
            mine = list(local[p])
        else:  # the owner's shapes and dtypes
            out_dims, in_dims = modules[p].weight.shape
            shape = (out_dims, in_dims // clip_targets[p][1])
            mine = [mx.zeros(shape, dtype=mx.float32), mx.zeros(shape, dtype=mx.float32),
                    mx.zeros((2,), dtype=mx.float32)]
        s, b, st = dist.broadcast_from(owner, mine)
        out[p] = (s, b, {"rtn_error": float(st[0]), "clip_error": float(st[1])})
    return out


# ---------------------------------------------------------------- stages

def _loss_fn(cfg: StageConfig, gamma: float, image_token: int):
    def loss_fn(model, batch):
        lg = vlm_logits(model, batch["input_ids"], batch["pixel_values"], image_token)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        total = mx.array(0.0)
        metrics = {}
        if cfg.ce_weight:
            ce = D.cross_entropy(lg, ids, mask, cfg.label_smoothing)
            total = total + cfg.ce_weight * ce
            metrics["loss_ce"] = ce
        if cfg.distill_weight:
            kd = D.distill_loss(lg, batch["teacher"], ids, mask, cfg.distill, gamma)
            total = total + cfg.distill_weight * kd
            metrics["loss_distill"] = kd
        return total, metrics, float(mask[:, 1:].sum())

    return loss_fn


def _batcher(samples, cfg: StageConfig, pad_id: int, teacher, image_token: int, topk=None):
    from .train_loop import batch_order

    def get_batch(step):
        idx = dist.shard(batch_order(len(samples), step, cfg.train.batch, cfg.train.seed))
        b = collate([samples[i] for i in idx], pad_id, [topk[i] for i in idx] if topk else None)
        return _with_teacher(b, cfg, teacher, image_token)

    return get_batch


def _with_teacher(b: dict, cfg: StageConfig, teacher, image_token: int) -> dict:
    """The batch with live teacher logits, when the loss distills and it has none cached."""
    if cfg.distill_weight and "teacher" not in b:
        b["teacher"] = mx.stop_gradient(vlm_logits(teacher, b["input_ids"], b["pixel_values"], image_token))
        mx.eval(b["teacher"])
    return b


def _gamma(cfg, teacher, get_batch, image_token, run_dir: Path, name: str, log) -> float:
    if not (cfg.distill_weight and cfg.distill == "cakld"):
        return 0.5
    path = run_dir / f"{name}_gamma.json"
    saved = dist.broadcast_json(json.loads(path.read_text()) if dist.is_main() and path.is_file()
                                else None)
    if saved is not None:
        return saved["gamma"]
    gamma = estimate_gamma(teacher, get_batch, cfg.gamma_batches, image_token)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"gamma": gamma, "batches": cfg.gamma_batches}))
    log(f"{name}: CAKLD gamma (teacher mean top-1 probability) = {gamma:.4f}")
    return gamma


def _held_out(model, loss_fn, val_samples: list, cfg: StageConfig, pad_id: int, teacher,
              image_token: int):
    """held_out() for train(): the training loss, token-weighted over the held-out samples,
    with live teacher logits (None without held-out samples)."""
    if not val_samples:
        return None

    def held_out() -> float:
        total = tokens = 0.0
        for i in range(0, len(val_samples), cfg.train.batch):
            b = _with_teacher(collate(val_samples[i : i + cfg.train.batch], pad_id), cfg, teacher,
                              image_token)
            loss, _, n = loss_fn(model, b)
            total, tokens = total + float(loss) * n, tokens + n
        return total / max(tokens, 1.0)

    return held_out


def run_stage2(model, teacher, samples: list, cfg: StageConfig, run_dir: Path, pad_id: int,
               image_token: int, resume: bool = False, log=print, val_samples: list = ()) -> dict:
    """Train mlp1 (float) between the quantized ViT and the frozen float language model."""
    if not samples:
        raise SpeedQError("stage 2 needs image-text training samples (--data FILE)")
    model.freeze()
    for layer in model.mlp1:
        if isinstance(layer, nn.Module) and layer.parameters():
            layer.unfreeze()
    get_batch = _batcher(samples, cfg, pad_id, teacher, image_token)
    gamma = _gamma(cfg, teacher, get_batch, image_token, Path(run_dir), "stage2", log)
    fp = fingerprint(asdict(cfg), samples_fingerprint(samples), samples_fingerprint(val_samples))
    loss_fn = _loss_fn(cfg, gamma, image_token)
    return train(model, loss_fn, get_batch, cfg.train, run_dir, "stage2", resume, log, fp,
                 held_out=_held_out(model, loss_fn, val_samples, cfg, pad_id, teacher, image_token))


def run_stage3(model, teacher, plan: dict, samples: list, calib_batches: list,
               cfg: StageConfig, run_dir: Path, pad_id: int, image_token: int, scale_dtype,
               resume: bool = False, log=print, val_samples: list = ()) -> dict:
    """Clip-init + QAT of the language model; the model's language linears end up QuantLinear."""
    if not samples:
        raise SpeedQError("stage 3 needs training samples (--data FILE)")
    run_dir = Path(run_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    topk = None
    if cfg.teacher == "cached" and cfg.distill_weight:
        topk = teacher_topk_cache(teacher, samples, cfg.topk, run_dir / "teacher_topk", image_token)
    # embeddings / lm_head: at their recipe bits, frozen, before QAT (so training sees them)
    from .plan import apply_plan, quantized_paths

    done = set(quantized_paths(model))
    apply_plan(model, {p: s for p, s in plan.items() if p not in done and
                       p.endswith(("embed_tokens", "lm_head"))}, scale_dtype=scale_dtype)
    stats = quantize_language(model, plan, cfg, calib_batches, image_token, scale_dtype, log)
    if dist.is_main():
        (run_dir / "clip_init.json").write_text(json.dumps(stats, indent=1))
    model.freeze()
    for p, m in model.named_modules():
        if isinstance(m, QuantLinear) and p.startswith("language_model.model.layers."):
            m.unfreeze()  # latent weight, float bias, and learnable scales/biases if any
            # (embeddings and lm_head stay frozen: quantized once, as the method has it)
    if cfg.train_projector:
        for layer in model.mlp1:
            if isinstance(layer, nn.Module) and layer.parameters():
                layer.unfreeze()
    if cfg.grad_checkpoint:
        grad_checkpoint(model.language_model.model.layers[0])
    get_batch = _batcher(samples, cfg, pad_id, teacher, image_token, topk)
    gamma = _gamma(cfg, teacher, get_batch, image_token, run_dir, "stage3", log)
    fp = fingerprint(asdict(cfg), samples_fingerprint(samples), samples_fingerprint(val_samples),
                     sorted(plan.items()))
    loss_fn = _loss_fn(cfg, gamma, image_token)
    result = train(model, loss_fn, get_batch, cfg.train, run_dir, "stage3", resume, log, fp,
                   held_out=_held_out(model, loss_fn, val_samples, cfg, pad_id, teacher, image_token))
    result["gamma"] = gamma
    return result
