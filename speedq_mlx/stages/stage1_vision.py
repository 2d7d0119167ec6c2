"""SPEED-Q stage 1: block-wise learned rounding (AdaRound, BRECQ's setting) of the ViT.

For each InternViT block in order: quantize its linears with the recipe's vision bits
(per linear, the min/max grid or a shrink-factor MSE search, whichever fits the block's
outputs better), then learn, for every weight, whether it rounds down or up so that the
block's output on the inputs produced by the already-quantized previous blocks matches
the full-precision block on full-precision inputs. The rounding is hardened to exact
integer codes (or, if that ends worse than where it started, the starting rounding is
kept), so the result is an ordinary `QuantLinear` in MLX's affine format and exports
exactly.

Block inputs/targets are cached in memory and in the run folder after every block, so
an interrupted run resumes at the next block with the same codes.

Under `mlx.launch` each rank computes its contiguous share of the calibration tiles'
block inputs, targets and errors (the shares are gathered, so every rank holds all
tiles' activations and AdaRound draws the same random batches as one process); each
AdaRound step's batch is split over the ranks and the gradients averaged. Rank 0 alone
writes the checkpoints and the report.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import SpeedQError
from ..quant import format as Q
from ..quant.adaround import AdaRoundLinear, adaround_init, adaround_regularizer
from ..quant.layers import QuantLinear
from ..run import Run, RunFolder
from ..train import distributed as dist

LINEARS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass
class Stage1Config:
    """Recipe [stage1] knobs (defaults are scaled for a laptop, not BRECQ's 20k iters)."""

    images: int = 64          # calibration images (all their tiles are used)
    max_tiles: int = 256      # cap on calibration tiles
    iters: int = 200          # AdaRound steps per block
    batch: int = 8            # tiles per step
    lr: float = 1e-3          # Adam on the rounding variables
    reg: float = 0.01         # weight of the rounding regulariser
    warmup: float = 0.2       # fraction of steps without the regulariser
    beta_start: float = 20.0  # regulariser exponent, annealed linearly to beta_end
    beta_end: float = 2.0
    layers: list = field(default_factory=lambda: list(LINEARS))
    mse_grid: int = 20        # shrink factors tried for the scale/bias init
    min_shrink: float = 0.5
    eval_chunk: int = 32      # tiles per forward when measuring errors
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: dict) -> "Stage1Config":
        raw = dict(recipe.get("stage1", {}))
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpeedQError(f"recipe [stage1]: unknown key(s) {', '.join(sorted(unknown))}")
        bad = set(raw.get("layers", [])) - set(LINEARS)
        if bad:
            raise SpeedQError(f"recipe [stage1] layers: unknown {sorted(bad)} (choose from {list(LINEARS)})")
        return cls(**raw)


def calibration_pixels(config: dict, image_paths: list, cfg: Stage1Config, dtype) -> mx.array:
    """Channel-last tiles [N, S, S, 3] of the first `cfg.images` images, at most max_tiles."""
    from ..data.images import image_processor, tiles

    proc = image_processor(config)
    out, n = [], 0
    for path in image_paths[: cfg.images]:
        t = tiles(proc, path)
        out.append(t)
        n += t.shape[0]
        if n >= cfg.max_tiles:
            break
    if not out:
        raise SpeedQError("stage 1 needs at least one calibration image (--images DIR)")
    pixels = mx.concatenate(out, axis=0)[: cfg.max_tiles]
    return pixels.transpose(0, 2, 3, 1).astype(dtype)


def _chunked(fn, x: mx.array, chunk: int) -> mx.array:
    outs = []
    for i in range(0, x.shape[0], chunk):
        y = fn(x[i : i + chunk])
        mx.eval(y)
        outs.append(y)
    return mx.concatenate(outs, axis=0)


def _chunked_all(fn, x: mx.array, chunk: int) -> mx.array:
    """_chunked over all tiles; under a launcher each rank does its share, then all gather."""
    if dist.size() == 1:
        return _chunked(fn, x, chunk)
    lo, hi = dist.shard_range(x.shape[0])
    local = _chunked(fn, x[lo:hi], chunk) if hi > lo else fn(x[:1])[:0]
    return dist.gather_rows(local, x.shape[0])


def _mse(block, x, target, chunk) -> float:
    """Mean squared error per element of block(x) against target (each rank sums its share
    of the tiles under a launcher)."""
    lo, hi = dist.shard_range(x.shape[0])
    total = 0.0
    for i in range(lo, hi, chunk):
        d = block(x[i : min(i + chunk, hi)]) - target[i : min(i + chunk, hi)]
        total += float((d.astype(mx.float32) ** 2).sum())
    if dist.size() > 1:
        (total,) = dist.sum_floats(total)
    return total / target.size


def _copy_block(block, vision_config):
    """An independent float copy of an InternViT EncoderLayer (its linears can be swapped)."""
    from mlx_vlm.models.internvl_chat.vision import EncoderLayer

    twin = EncoderLayer(vision_config)
    twin.update(block.parameters())
    twin.eval()
    return twin


def set_linear(block, dotted: str, module) -> None:
    """Put `module` at a block's linear "attn.qkv", "mlp.fc1", ... (see LINEARS)."""
    parent_name, leaf = dotted.split(".")
    setattr(getattr(block, parent_name), leaf, module)


def get_linear(block, dotted: str):
    parent_name, leaf = dotted.split(".")
    return getattr(getattr(block, parent_name), leaf)


def _rtn_block(block, vision_config, settings: dict, scale_dtype):
    """The same block with min/max round-to-nearest linears (the baseline)."""
    twin = _copy_block(block, vision_config)
    for dotted, (bits, group) in settings.items():
        lin = get_linear(block, dotted)
        set_linear(twin, dotted, QuantLinear(lin.weight, lin.get("bias"), bits=bits,
                                       group_size=group, scale_dtype=scale_dtype))
    return twin


def _choose_grids(block_q, ada: dict, x, target, cfg: Stage1Config, scale_dtype) -> tuple[float, dict]:
    """Per linear, keep MLX's round-to-nearest grid (the start) or switch to plain min/max or
    to the weight-MSE shrink search, whichever gives the lower block output error with
    nearest rounding.

    At 2 bits the weight-MSE optimum clips the few large weights the outputs depend on: on
    the tiny-shapes ViT it made a block's output error 3-7x that of plain min/max.
    Returns (block error of the chosen grids, dotted name -> "rtn" | "minmax" | "mse")."""
    alternatives = {
        "minmax": lambda m: Q.minmax_params(m.weight, m.bits, m.group_size, scale_dtype),
        "mse": lambda m: Q.mse_params(m.weight, m.bits, m.group_size, scale_dtype, cfg.mse_grid,
                                      cfg.min_shrink),
    }
    for m in ada.values():
        m.hard = True
    best = _mse(block_q, x, target, cfg.eval_chunk)
    grids = {}
    for dotted, m in ada.items():
        grids[dotted] = "rtn"
        for name, params in alternatives.items():
            old = m.scales, m.biases, m.V
            m.scales, m.biases = params(m)
            m.V = adaround_init(m.weight, m.scales, m.biases, m.group_size)
            err = _mse(block_q, x, target, cfg.eval_chunk)
            if err < best:
                best, grids[dotted] = err, name
            else:
                m.scales, m.biases, m.V = old
    for m in ada.values():
        m.hard = False
    return best, grids


def _train_block(block_q, ada: dict, x_q, target, cfg: Stage1Config, key, log_every=None):
    """Adam on the rounding variables V of `ada` (dotted name -> AdaRoundLinear)."""
    block_q.freeze()
    for m in ada.values():
        m.unfreeze(keys=["V"])
    opt = optim.Adam(learning_rate=cfg.lr)
    n = x_q.shape[0]
    warm = int(cfg.warmup * cfg.iters)

    def loss_fn(xb, yb, beta, lam):  # block_q closed over (see train_loop._value_metrics_grads)
        d = block_q(xb) - yb
        rec = (d * d).reshape(d.shape[0], -1).sum(axis=1).mean()
        reg = sum(adaround_regularizer(m.V, beta) for m in ada.values())
        return rec + lam * reg, rec

    step = nn.value_and_grad(block_q, loss_fn)
    keys = mx.random.split(key, cfg.iters)
    b = min(cfg.batch, n)
    dist.check_split(b, "stage 1's batch of tiles (recipe [stage1] batch, at most the calibration tiles)")
    lo, hi = dist.shard_range(b)  # this rank's share of every step's batch
    for it in range(cfg.iters):
        idx = mx.random.randint(0, n, (b,), key=keys[it])
        if dist.size() > 1:
            idx = idx[lo:hi]
        if it < warm:
            beta, lam = cfg.beta_start, 0.0
        else:
            t = (it - warm) / max(1, cfg.iters - warm)
            beta, lam = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - t), cfg.reg
        (_, _), grads = step(x_q[idx], target[idx], beta, lam)
        grads = dist.average_gradients(grads, hi - lo, b)  # the batch mean over all ranks' tiles
        opt.update(block_q, grads)
        mx.eval(block_q.trainable_parameters(), opt.state)


def _fingerprint(cfg: Stage1Config, settings: dict, pixels: mx.array, n_blocks: int) -> str:
    h = hashlib.sha256(json.dumps([asdict(cfg), sorted((k, list(v)) for k, v in settings.items()),
                                   list(pixels.shape), n_blocks]).encode())
    h.update(bytes(memoryview(mx.array(pixels[:, ::7, ::7, :]).astype(mx.float32))))
    return h.hexdigest()[:16]


PREFIX = "vision_model.encoder.layers"
STATE = "stage1"  # checkpoint folder inside the run folder


def block_settings(plan: dict, n_blocks: int, cfg: Stage1Config) -> list[dict]:
    """Per ViT block: dotted linear name -> (bits, group) of the linears stage 1 learns."""
    return [{LINEARS[k]: plan[f"{PREFIX}.{i}.{LINEARS[k]}"] for k in cfg.layers
             if plan.get(f"{PREFIX}.{i}.{LINEARS[k]}") is not None} for i in range(n_blocks)]


def run_stage1(run: Run, model, plan: dict, pixels: mx.array, cfg: Stage1Config) -> dict:
    """Quantize model.vision_model's blocks in place; returns the per-block report."""
    from tqdm import tqdm

    layers = model.vision_model.encoder.layers
    per_block = block_settings(plan, len(layers), cfg)
    fp = _fingerprint(cfg, {f"{i}.{k}": v for i, s in enumerate(per_block) for k, v in s.items()},
                      pixels, len(layers))
    report, x_q, x_fp = _start(run, model, per_block, pixels, cfg, fp)
    start = len(report["blocks"])
    bar = tqdm(range(start, len(layers)), desc="stage 1 (vision blocks)", unit="block",
               initial=start, total=len(layers), disable=not dist.is_main())
    for i in bar:
        target = _chunked_all(layers[i], x_fp, cfg.eval_chunk)
        if per_block[i]:
            entry = _quantize_block(model, i, per_block[i], x_q, target, cfg, run.out_dtype)
            bar.set_postfix(rtn=f"{entry['rtn_mse']:.3g}", final=f"{entry['final_mse']:.3g}")
            (bar.write if run.log is print else run.log)(
                f"stage 1 block {i}: mse rtn {entry['rtn_mse']:.4g} -> init {entry['init_mse']:.4g} -> "
                f"adaround {entry['final_mse']:.4g}"
                f"{' (kept the initial rounding)' if entry['kept_init_rounding'] else ''} "
                f"({entry['seconds']}s)")
        else:
            entry = {"block": i, "skipped": True}
        x_q, x_fp = _chunked_all(layers[i], x_q, cfg.eval_chunk), target
        report["blocks"].append(entry)
        if dist.is_main():
            _save(run.folder, report, layers, x_q, x_fp, i + 1)
    run.folder.write_json("stage1_report.json", report, indent=2)
    return report


def _start(run: Run, model, per_block: list, pixels, cfg: Stage1Config, fp: str):
    """(report, quantized-path inputs, float inputs) of the next block: from the
    checkpoint of an interrupted run, else the patch embeddings of the tiles."""
    layers = model.vision_model.encoder.layers
    state = run.folder.checkpoint_state(STATE, fp, "stage-1", "settings or images")
    if state is None:
        run.folder.ensure()
        x_fp = _chunked_all(model.vision_model.embeddings, pixels, cfg.eval_chunk)
        return {"fingerprint": fp, "config": asdict(cfg), "tiles": int(pixels.shape[0]),
                "blocks": []}, x_fp, x_fp
    done = len(state["blocks"])
    _load_blocks(run.folder, layers, done, run.out_dtype, per_block)
    acts = run.folder.read_arrays(f"{STATE}/acts.safetensors")
    run.log(f"stage 1: resuming at block {done}/{len(layers)}")
    return state, acts["x_q"], acts["x_fp"]


def _quantize_block(model, i: int, settings: dict, x_q, target, cfg: Stage1Config,
                    scale_dtype) -> dict:
    """AdaRound block i's linears against `target`; the block ends up holding QuantLinears."""
    t0 = time.time()
    block, vcfg = model.vision_model.encoder.layers[i], model.config.vision_config
    rtn_loss = _mse(_rtn_block(block, vcfg, settings, scale_dtype), x_q, target, cfg.eval_chunk)
    block_q = _copy_block(block, vcfg)
    ada = {}
    for dotted, (bits, group) in settings.items():
        lin = get_linear(block, dotted)
        s_, b_ = Q.rtn_params(lin.weight, bits, group, scale_dtype)
        ada[dotted] = AdaRoundLinear(lin.weight, lin.get("bias"), s_, b_, bits, group, scale_dtype)
        set_linear(block_q, dotted, ada[dotted])
    init_loss, grids = _choose_grids(block_q, ada, x_q, target, cfg, scale_dtype)
    init_V = {d: m.V for d, m in ada.items()}
    _train_block(block_q, ada, x_q, target, cfg, mx.random.key(cfg.seed * 100003 + i))
    for dotted, m in ada.items():
        set_linear(block, dotted, m.harden())
    final_loss = _mse(block, x_q, target, cfg.eval_chunk)
    kept_init = final_loss > init_loss  # learned rounding must not end worse than its start
    if kept_init:
        for dotted, m in ada.items():
            m.V = init_V[dotted]
            set_linear(block, dotted, m.harden())
        final_loss = _mse(block, x_q, target, cfg.eval_chunk)
    return {"block": i, "rtn_mse": rtn_loss, "init_mse": init_loss, "final_mse": final_loss,
            "grids": grids, "kept_init_rounding": kept_init, "seconds": round(time.time() - t0, 2)}


def _save(folder: RunFolder, report: dict, layers, x_q, x_fp, done: int) -> None:
    """Checkpoint atomically: quantized blocks so far, next inputs, report."""
    weights = {}
    for i in range(done):
        for dotted in LINEARS.values():
            m = get_linear(layers[i], dotted)
            if isinstance(m, QuantLinear):
                for k, v in tree_flatten(m.parameters()):
                    weights[f"{PREFIX}.{i}.{dotted}.{k}"] = v
    with folder.atomic(STATE) as tmp:
        mx.save_safetensors(str(tmp / "blocks.safetensors"), weights or {"_": mx.zeros(1)})
        mx.save_safetensors(str(tmp / "acts.safetensors"), {"x_q": x_q, "x_fp": x_fp})
        (tmp / "state.json").write_text(json.dumps(report, indent=2))


def _load_blocks(folder: RunFolder, layers, done: int, scale_dtype, per_block) -> None:
    saved = folder.read_arrays(f"{STATE}/blocks.safetensors")
    for i in range(done):
        for dotted, (bits, group) in per_block[i].items():
            key = f"{PREFIX}.{i}.{dotted}"
            layer = QuantLinear(saved[key + ".weight"], saved.get(key + ".bias"), bits=bits,
                                group_size=group, scale_dtype=scale_dtype,
                                scales=saved[key + ".scales"], biases=saved[key + ".biases"])
            layer.freeze()
            set_linear(layers[i], dotted, layer)


def load_stage1(run: Run, model, plan: dict) -> bool:
    """Put a finished stage 1 from an earlier run (--stages 1) into the model, if there is one."""
    state = run.folder.read_json(f"{STATE}/state.json")
    if state is None:
        return False
    layers = model.vision_model.encoder.layers
    if len(state["blocks"]) != len(layers):
        raise SpeedQError(f"{run.folder.file(STATE)} holds an unfinished stage 1; run --stages 1 "
                          "--resume first")
    per_block = block_settings(plan, len(layers), Stage1Config(**state["config"]))
    _load_blocks(run.folder, layers, len(layers), run.out_dtype, per_block)
    return True
