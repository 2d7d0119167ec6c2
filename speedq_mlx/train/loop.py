"""The optimisation loop stages 2 and 3 share: AdamW, warm-up + cosine schedule,
gradient clipping, a NaN/inf guard, checkpoints with exact resume, a JSONL log, a
loss-curve PNG and a progress bar.

Resume is exact because (a) the batch of step t is a pure function of (seed, t), and
(b) a checkpoint holds the trainable parameters and the whole optimizer state (its
step counter drives the schedule).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import SpeedQError
from . import distributed as dist


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 1e-4
    warmup: float = 0.03          # fraction of steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0        # max global gradient norm (0: off)
    batch: int = 4
    checkpoint_every: int = 50
    seed: int = 0
    qparams_lr: float | None = None  # learning rate of learned scales/biases (default: lr)
    micro_batch: int = 0          # samples per forward/backward pass (0: the whole batch at once)

    @classmethod
    def from_section(cls, section: dict, name: str, extra: tuple = ()) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known - set(extra)
        if unknown:
            raise SpeedQError(f"recipe [{name}]: unknown key(s) {', '.join(sorted(unknown))}")
        cfg = cls(**{k: v for k, v in section.items() if k in known})
        if cfg.micro_batch < 0:
            raise SpeedQError(f"recipe [{name}] micro_batch must be >= 0 (0: the whole batch), got {cfg.micro_batch}")
        return cfg


def schedule(cfg: TrainConfig, lr: float | None = None):
    """Linear warm-up from lr/100, then cosine decay to lr/100."""
    lr = cfg.lr if lr is None else lr
    warm = max(1, int(cfg.warmup * cfg.steps))
    decay = optim.cosine_decay(lr, max(1, cfg.steps - warm), end=lr * 0.01)
    return optim.join_schedules([optim.linear_schedule(lr * 0.01, lr, warm), decay], [warm])


def optimizer(cfg: TrainConfig):
    """AdamW; with qparams_lr, learned scales/biases get their own (on the same schedule)."""
    weights = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    if cfg.qparams_lr is None:
        return weights
    qparams = optim.AdamW(learning_rate=schedule(cfg, cfg.qparams_lr), weight_decay=0.0)
    return optim.MultiOptimizer([qparams, weights], [lambda path, _: path.endswith((".scales", ".biases"))])


def _lr(opt) -> float:
    """The weights' learning rate now (the last optimizer of a MultiOptimizer)."""
    return float(getattr(opt, "optimizers", [opt])[-1].learning_rate)


def batch_order(n: int, step: int, batch: int, seed: int) -> list[int]:
    """Indices of step's batch: epochs of seeded permutations, a pure function of step."""
    import numpy as np

    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        pos += take
    return out


def _save_trainable(path: Path, model: nn.Module) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(model.trainable_parameters())))


def _load_trainable(path: Path, model: nn.Module) -> None:
    """Rank 0 reads the file; under a launcher every other rank receives it."""
    weights = dist.broadcast_arrays(mx.load(str(path)) if dist.is_main() else None)
    model.load_weights(list(weights.items()), strict=False)


def _save_checkpoint(folder, name: str, model: nn.Module, opt, step: int, extra: dict) -> None:
    with folder.atomic(name) as tmp:
        _save_trainable(tmp / "trainable.safetensors", model)
        state = dict(tree_flatten(opt.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"),
                            {k: v for k, v in state.items() if isinstance(v, mx.array)})
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))


def _load_checkpoint(folder, name: str, model: nn.Module, opt) -> None:
    """Rank 0 reads the checkpoint; under a launcher every other rank receives it."""
    _load_trainable(folder.file(f"{name}/trainable.safetensors"), model)
    opt.state = tree_unflatten(list(folder.read_arrays(f"{name}/optimizer.safetensors").items()))


def plot_losses(log_path: Path, png_path: Path, title: str) -> None:
    """Loss curve(s) of a JSONL training log as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in [k for k in rows[0] if k.startswith("loss")]:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(model: nn.Module, loss_fn: Callable, get_batch: Callable, cfg: TrainConfig,
          folder, name: str, fingerprint: str = "", log=print,
          on_step: Callable | None = None, held_out: Callable | None = None) -> dict:
    """Optimise model.trainable_parameters() for cfg.steps steps, checkpointing into the
    run folder (`run.RunFolder`) as <name>_ckpt/ and logging to <name>_log.jsonl.

    loss_fn(model, batch) -> (loss, {metric: value}, n_tokens); get_batch(step) -> batch, or
    a list of micro-batches whose gradients are accumulated (`accumulate`).
    Returns {"steps", "final_loss", "log"} (+ "best_step", "held_out_loss").

    held_out() -> loss on data not trained on. With it, the start and every checkpoint are
    scored, the best one's parameters are kept in <name>_best/, and the model ends with
    those: with little data, training can over-fit, and the result should never be worse
    on held-out data than where it started.

    Under `mlx.launch` get_batch(step) returns this rank's shard of the step's batch; the
    loss (a per-token mean over its n_tokens), metrics and gradients are combined over the
    ranks as one process computes them on the whole batch, and rank 0 alone writes the
    checkpoints and the log.
    """
    from tqdm import tqdm

    opt = optimizer(cfg)
    log_path = folder.file(f"{name}_log.jsonl")
    start = _resume(folder, name, model, opt, fingerprint, log_path)
    if start:
        log(f"{name}: resuming at step {start}/{cfg.steps}")
    best = None
    if held_out is not None:
        best = _start_best(folder, name, model, held_out, start, fingerprint, log)
    bar = tqdm(range(start, cfg.steps), desc=name, unit="step", initial=start, total=cfg.steps,
               disable=not dist.is_main())
    last_good, loss_value = start, float("nan")
    for step in bar:
        row = _step(model, loss_fn, get_batch(step), opt, cfg, step, name, folder, last_good)
        loss_value = row["loss"]
        at_checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        if held_out is not None and at_checkpoint:
            row["held_out_loss"] = float(held_out())
            best = _keep_if_best(folder, name, model, row["held_out_loss"], step + 1, best, fingerprint)
        if dist.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if on_step:
            on_step(step + 1)
        if at_checkpoint:
            if dist.is_main():
                _save_checkpoint(folder, f"{name}_ckpt", model, opt, step + 1, {"fingerprint": fingerprint})
            last_good = step + 1
    if dist.is_main():
        plot_losses(log_path, folder.file(f"{name}_loss.png"), name)
    result = {"steps": cfg.steps, "final_loss": loss_value, "log": str(log_path)}
    if best is not None:
        _end_with_best(folder, name, model, best, cfg.steps, log)
        result.update(best_step=best["step"], held_out_loss=best["held_out_loss"])
    return result


def _resume(folder, name: str, model, opt, fingerprint: str, log_path: Path) -> int:
    """The step to start at: that of a checkpoint to continue (loaded into model and
    optimizer), else 0 with a fresh log."""
    state = folder.checkpoint_state(f"{name}_ckpt", fingerprint, name, "settings or data")
    if state is None:
        if dist.is_main():
            folder.ensure()
            log_path.write_text("")
        return 0
    _load_checkpoint(folder, f"{name}_ckpt", model, opt)
    if dist.is_main():
        _truncate_log(log_path, state["step"])
    return state["step"]


def _step(model, loss_fn, batch, opt, cfg: TrainConfig, step: int, name: str, folder,
          last_good: int) -> dict:
    """One optimiser step; returns its log row. A non-finite loss stops the run."""
    t0 = time.time()
    (loss, metrics, n_tok), grads = accumulate(model, loss_fn, batch)
    (loss, metrics, n_tok), grads = dist.reduce_step(loss, metrics, n_tok, grads)
    if cfg.grad_clip:
        grads, gnorm = optim.clip_grad_norm(grads, cfg.grad_clip)
    else:
        gnorm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    loss_value, gnorm = float(loss), float(gnorm)
    if not (math.isfinite(loss_value) and math.isfinite(gnorm)):
        raise SpeedQError(f"{name}: non-finite loss or gradient at step {step} (loss {loss_value}, "
                          f"grad norm {gnorm}); the last good checkpoint is at step {last_good} in "
                          f"{folder.file(name + '_ckpt')} (lower the learning rate and --resume)")
    opt.update(model, grads)
    del grads  # now held by the update's graph alone, so each module's are freed with it
    eval_by_module(tree_flatten(model.trainable_parameters()))
    mx.eval(model.trainable_parameters(), opt.state)
    dt = time.time() - t0
    return {"step": step + 1, "loss": loss_value, **{k: float(v) for k, v in metrics.items()},
            "lr": _lr(opt), "grad_norm": gnorm, "tokens": int(n_tok),
            "tokens_per_s": round(n_tok / dt, 1)}


def eval_by_module(named: list) -> None:
    """Evaluate (parameter path, array) pairs a module at a time, the last layers first.

    Evaluated at once, a step's new weights, Adam moments and summed gradients all exist
    beside the arrays they replace: ~2x the trainable parameters on top of weights and
    moments (~3 GB on a 0.5B language model). A module at a time, in the order the backward
    pass makes them, each module's old arrays and gradients are freed before the next
    module's are made."""
    by_module: dict[str, list] = {}
    for path, value in named:
        by_module.setdefault(path.rpartition(".")[0], []).append(value)
    for values in reversed(list(by_module.values())):
        mx.eval(values)


def _start_best(folder, name: str, model, held_out: Callable, start: int, fingerprint: str,
                log) -> dict:
    """The best checkpoint so far: the saved one when resuming, else the start, scored."""
    best = folder.read_json(f"{name}_best/state.json") if start else None
    if best is None or best.get("fingerprint") != fingerprint:
        best = _keep_if_best(folder, name, model, held_out(), start, None, fingerprint)
        log(f"{name}: held-out loss at step {start}: {best['held_out_loss']:.4f}")
    return best


def _keep_if_best(folder, name: str, model, loss: float, step: int, best: dict | None,
                  fingerprint: str) -> dict:
    """The new best (its trainable parameters saved to <name>_best/) if `loss` beats `best`."""
    if best is not None and not loss < best["held_out_loss"]:
        return best
    best = {"step": step, "held_out_loss": loss, "fingerprint": fingerprint}
    if dist.is_main():
        with folder.atomic(f"{name}_best") as tmp:
            _save_trainable(tmp / "trainable.safetensors", model)
            (tmp / "state.json").write_text(json.dumps(best))
    return best


def _end_with_best(folder, name: str, model, best: dict, steps: int, log) -> None:
    if best["step"] != steps:
        _load_trainable(folder.file(f"{name}_best/trainable.safetensors"), model)
        mx.eval(model.parameters())
        log(f"{name}: keeping step {best['step']}, the lowest held-out loss "
            f"({best['held_out_loss']:.4f})")


def accumulate(model, loss_fn, batch):
    """_value_metrics_grads of a batch, or of a list of micro-batches combined by tokens as
    one pass over their union computes them: a step's activations are then those of one
    micro-batch (on a 0.5B VLM, a photo conversation's backward pass is several GB)."""
    if not isinstance(batch, list):
        return _value_metrics_grads(model, loss_fn, batch)
    loss_sum, metric_sums, tokens, grad_sums = mx.array(0.0), {}, 0.0, None
    for part in batch:
        (loss, metrics, n_tok), grads = _value_metrics_grads(model, loss_fn, part)
        w = float(n_tok)
        grads = tree_map(lambda g: g * w, grads)
        grad_sums = grads if grad_sums is None else tree_map(mx.add, grad_sums, grads)
        del grads  # a part's gradients are freed as they are summed
        loss_sum = loss_sum + loss * w
        metric_sums = {k: metric_sums.get(k, 0.0) + v * w for k, v in metrics.items()}
        tokens += w
        eval_by_module(tree_flatten(grad_sums))
        mx.eval(loss_sum, grad_sums, *metric_sums.values())  # frees this part's graph
    d = max(tokens, 1.0)
    return ((loss_sum / d, {k: v / d for k, v in metric_sums.items()}, tokens),
            tree_map(lambda g: g / d, grad_sums))


def _value_metrics_grads(model, loss_fn, batch):
    """Loss, metrics and gradients in one pass (metrics ride along as a closure).

    The model is closed over, not passed as an argument: mx.value_and_grad swaps every
    array inside its arguments for a tracer copy, which would defeat the dequantized-weight
    cache of frozen quantized layers (a 4-bit lm_head re-quantized every step)."""
    box = {}

    def wrapped(b):
        loss, metrics, n_tok = loss_fn(model, b)
        box["metrics"], box["n"] = metrics, n_tok
        return loss

    loss, grads = nn.value_and_grad(model, wrapped)(batch)
    return (loss, {k: v for k, v in box["metrics"].items()}, box["n"]), grads


def _truncate_log(log_path: Path, steps: int) -> None:
    """Drop log rows past the checkpoint (they are recomputed after resume)."""
    if log_path.exists():
        rows = [l for l in log_path.read_text().splitlines() if l.strip()]
        log_path.write_text("".join(l + "\n" for l in rows if json.loads(l)["step"] <= steps))
