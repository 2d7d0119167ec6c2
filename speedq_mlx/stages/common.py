"""What stages 2 and 3 share: their recipe section, their data, the loss (CE + distillation
against the full-precision teacher on the same batch), batches, CAKLD's gamma and the
held-out score that picks the checkpoint a stage ends with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx

from ..data.encode import collate as collate_samples
from ..data.sources import TrainData
from ..errors import SpeedQError
from ..model.forward import row_logits
from ..quant.layers import pack_frozen
from ..run import Run, fingerprint
from ..train import distributed as dist
from ..train.loop import TrainConfig, batch_order, train
from . import losses as L
from .teacher import estimate_gamma

STAGE_KEYS = ("distill", "distill_weight", "ce_weight", "label_smoothing", "gamma_batches",
              "teacher", "topk", "learn_qparams", "clip_init", "clip_skip", "init",
              "train_projector", "grad_checkpoint", "clip_tokens", "clip_windows",
              "text_windows", "text_tokens")
INITS = ("clip", "gptq", "none")


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
    clip_init: bool = True            # false: init = "none"
    clip_skip: list = field(default_factory=lambda: ["q_proj", "k_proj"])
    init: str = "clip"                # clip (the paper's search) | gptq (+ error compensation) | none
    clip_tokens: int = 512            # calibration text window length (paper: 128 x 512)
    clip_windows: int = 128
    text_windows: int = 0             # --text windows added to stage 3's training samples
    text_tokens: int = 512
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
        if cfg.init not in INITS:
            raise SpeedQError(f"recipe [{name}] init must be one of {', '.join(INITS)}, got {cfg.init!r}")
        if cfg.text_windows < 0 or cfg.text_tokens < 2:
            raise SpeedQError(f"recipe [{name}] text_windows must be >= 0 and text_tokens >= 2")
        return cfg

    @property
    def start(self) -> str:
        """How the latent weights start: clip, gptq or none."""
        return self.init if self.clip_init else "none"


def collate(samples: list, pad_id: int, topk: list | None = None) -> dict:
    """data.encode.collate, plus the scored rows (batch index, position, next token) and,
    when cached, the teacher's top-k at those rows."""
    batch = collate_samples(samples, pad_id)
    batch["rows"] = L.answer_rows(batch["input_ids"], batch["loss_mask"])
    if topk is not None:
        n = batch["input_ids"].shape[1]
        b, t, _ = batch["rows"]
        idx = mx.stack([_pad_rows(k[0], n, 0) for k in topk])
        logp = mx.stack([_pad_rows(k[1], n, -1e4) for k in topk])
        batch["teacher"] = (idx[b, t], logp[b, t])
    return batch


def _pad_rows(a: mx.array, length: int, value) -> mx.array:
    if a.shape[0] == length:
        return a
    pad = mx.full((length - a.shape[0], a.shape[1]), value, dtype=a.dtype)
    return mx.concatenate([a, pad], axis=0)


def loss_fn(cfg: StageConfig, gamma: float, image_token: int):
    """lambda * distillation + zeta * CE per answer token: (loss, metrics, answer tokens)."""
    def loss(model, batch):
        b, t, targets = batch["rows"]
        lg = row_logits(model, batch["input_ids"], batch["pixel_values"], image_token, (b, t))
        total = mx.array(0.0)
        metrics = {}
        if cfg.ce_weight:
            ce = L.ce_rows(lg, targets, cfg.label_smoothing)
            total = total + cfg.ce_weight * ce
            metrics["loss_ce"] = ce
        if cfg.distill_weight:
            kd = L.distill_rows(lg, batch["teacher"], cfg.distill, gamma)
            total = total + cfg.distill_weight * kd
            metrics["loss_distill"] = kd
        return total, metrics, float(targets.shape[0])

    return loss


def batcher(run: Run, samples: list, cfg: StageConfig, teacher, topk=None):
    """get_batch(step): this rank's share of step's batch, with the teacher's targets; with
    [stage] micro_batch, a list of micro-batches of that many samples (train.loop.accumulate)."""
    def collated(idx):
        b = collate([samples[i] for i in idx], run.pad_id, [topk[i] for i in idx] if topk else None)
        return with_teacher(b, cfg, teacher, run.image_token)

    def get_batch(step):
        idx = dist.shard(batch_order(len(samples), step, cfg.train.batch, cfg.train.seed))
        size = cfg.train.micro_batch
        if not size or size >= len(idx):
            return collated(idx)
        return [collated(idx[i:i + size]) for i in range(0, len(idx), size)]

    return get_batch


def with_teacher(b: dict, cfg: StageConfig, teacher, image_token: int) -> dict:
    """The batch with live teacher logits at its scored rows, when the loss distills and it
    has no cached ones."""
    if cfg.distill_weight and "teacher" not in b:
        rows = b["rows"][:2]
        b["teacher"] = mx.stop_gradient(row_logits(teacher.model, b["input_ids"], b["pixel_values"],
                                                   image_token, rows))
        mx.eval(b["teacher"])
    return b


def gamma(run: Run, cfg: StageConfig, teacher, get_batch, name: str) -> float:
    """CAKLD's gamma, measured once and kept in the run folder (<name>_gamma.json)."""
    if not (cfg.distill_weight and cfg.distill == "cakld"):
        return 0.5
    saved = run.folder.read_json(f"{name}_gamma.json")
    if saved is not None:
        return saved["gamma"]
    value = estimate_gamma(teacher, get_batch, cfg.gamma_batches, run.image_token)
    run.folder.write_json(f"{name}_gamma.json", {"gamma": value, "batches": cfg.gamma_batches})
    run.log(f"{name}: CAKLD gamma (teacher mean top-1 probability) = {value:.4f}")
    return value


def held_out_score(run: Run, model, loss, held_out: list, cfg: StageConfig, teacher, topk=None):
    """held_out() for train(): the training loss, token-weighted over the held-out samples,
    with the teacher's cached top-k or live logits (None without held-out samples)."""
    if not held_out:
        return None

    def score() -> float:
        total = tokens = 0.0
        step = cfg.train.micro_batch or cfg.train.batch
        for i in range(0, len(held_out), step):
            part = slice(i, i + step)
            b = with_teacher(collate(held_out[part], run.pad_id, topk[part] if topk else None), cfg,
                             teacher, run.image_token)
            value, _, n = loss(model, b)
            total, tokens = total + float(value) * n, tokens + n
        return total / max(tokens, 1.0)

    return score


def train_stage(run: Run, model, teacher, data: TrainData, cfg: StageConfig, name: str,
                fingerprint_parts: tuple = (), topk=None, topk_held_out=None) -> dict:
    """The shared tail of stages 2 and 3: gamma, the loss, and the training loop (`teacher`
    a stages.teacher.Teacher; with cached top-k for training and held-out samples it is not
    asked for). Fake-quantized layers the stage does not train are packed for good first
    (`quant.layers.pack_frozen`): a latent weight nothing will train again is memory lost."""
    pack_frozen(model)
    mx.clear_cache()
    get_batch = batcher(run, data.samples, cfg, teacher, topk)
    g = gamma(run, cfg, teacher, get_batch, name)
    fp = fingerprint(computed_settings(cfg), *data.fingerprint(), *fingerprint_parts)
    loss = loss_fn(cfg, g, run.image_token)
    result = train(model, loss, get_batch, cfg.train, run.folder, name, fp, run.log,
                   held_out=held_out_score(run, model, loss, data.held_out, cfg, teacher, topk_held_out))
    result["gamma"] = g
    return result


def computed_settings(cfg: StageConfig) -> dict:
    """The settings that change what a stage computes, for its checkpoints' fingerprint:
    micro_batch does not (a run that ran out of memory resumes with a smaller one)."""
    settings = asdict(cfg)
    settings["train"].pop("micro_batch")
    return settings


def enable_grad_checkpoint(layer) -> None:
    """mlx-lm's grad_checkpoint (recompute this layer type's activations in the backward
    pass), applied once per layer type."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(layer)
    if not getattr(cls, "_speedq_checkpointed", False):
        grad_checkpoint(layer)
        cls._speedq_checkpointed = True
