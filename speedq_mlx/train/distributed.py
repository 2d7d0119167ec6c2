"""Data-parallel SPEED-Q on MLX's own distributed engine (`mx.distributed`).

Launched with `mlx.launch` (ring over TCP/Thunderbolt, MPI or JACCL), every process runs
the same `speedq-mlx quantize` command; `mx.distributed.init()` gives each its rank.
Without a launcher the group has size 1 and every helper here is the identity, so a
single process behaves exactly as it did before this module existed.

What is split and what is shared:

- a training step's global batch (the same `train_loop.batch_order` as one process) is
  cut into contiguous shards, one per rank; gradients are weighted by each shard's
  share of the loss (answer tokens in stages 2-3, tiles in stage 1) and averaged with
  `mlx.nn.average_gradients`, so every rank applies the update one process would;
- scalars (loss, metrics, token counts, CAKLD's gamma, errors) are all-summed;
- rank 0 alone reads and writes the run folder (checkpoints, logs, reports, teacher
  caches) and the artifact; what it reads (a checkpoint on resume, a cache) reaches
  the other ranks by `broadcast_*` (an all_sum to which the other ranks add zeros), so
  the machines need not share a file system - only the model and the data, at the same
  paths, on every machine.
"""

from __future__ import annotations

import json
from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..errors import SpeedQError


@lru_cache(maxsize=1)
def group():
    """The global group (size 1 without a launcher)."""
    return mx.distributed.init()


def size() -> int:
    return group().size()


def rank() -> int:
    return group().rank()


def is_main() -> bool:
    return rank() == 0


def shard_range(n: int) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most 1)."""
    w, r = size(), rank()
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def check_split(n: int, what: str) -> None:
    """The one rule for batches under a launcher: every rank needs at least one item."""
    if size() > 1 and n < size():
        raise SpeedQError(f"{what} = {n} cannot be split over {size()} processes; use a "
                          f"batch of at least {size()} (a multiple of it)")


def shard(items: list, what: str = "the recipe's batch") -> list:
    """This rank's contiguous share of a step's global batch (B/W items when W divides B)."""
    check_split(len(items), what)
    lo, hi = shard_range(len(items))
    return items[lo:hi]


def check_same(value: str, what: str) -> None:
    """Every rank must hold rank 0's `value` (a fingerprint of settings and data): all
    ranks stop with the same message otherwise, instead of training on different data."""
    if size() == 1:
        return
    ref = broadcast_json(value if is_main() else None)
    bad = sum_floats(float(ref != value))[0]
    if bad:
        raise SpeedQError(f"{int(bad)} process(es) have other {what} than rank 0: every machine "
                          "needs the same model, data files and options")


def check_batches(batches: dict) -> None:
    """Before anything runs: each stage's global batch ({"stage1": 4, ...}) must split over
    the processes."""
    for stage, b in batches.items():
        check_split(int(b), f"recipe [{stage}] batch")


def all_sum(x: mx.array) -> mx.array:
    return mx.distributed.all_sum(x, stream=mx.cpu) if size() > 1 else x


def sum_floats(*values: float) -> list[float]:
    """Python floats summed over ranks (float32 on the CPU stream, as mlx-lm's trainer does)."""
    if size() == 1:
        return [float(v) for v in values]
    out = all_sum(mx.array([float(v) for v in values], dtype=mx.float32))
    return [float(v) for v in out.tolist()]


def barrier() -> None:
    """Wait for every rank (a one-element all_sum)."""
    if size() > 1:
        mx.eval(all_sum(mx.ones(1)))


def broadcast_json(obj=None):
    """Rank 0's JSON-able `obj` on every rank (the others pass anything)."""
    if size() == 1:
        return obj
    raw = json.dumps(obj).encode() if is_main() else b""
    n = int(all_sum(mx.array([len(raw)], dtype=mx.int32)).item())
    buf = np.frombuffer(raw, dtype=np.uint8) if is_main() else np.zeros(n, dtype=np.uint8)
    out = all_sum(mx.array(buf))
    mx.eval(out)
    return json.loads(bytes(np.array(out)).decode())


def broadcast_arrays(arrays: dict | None) -> dict:
    """Rank 0's {name: array} on every rank; exact (the other ranks add zeros)."""
    if size() == 1:
        return arrays
    meta = broadcast_json({k: [list(v.shape), str(v.dtype).split(".")[-1]]
                           for k, v in arrays.items()} if is_main() else None)
    out = {}
    for k, (shape, dtype) in meta.items():
        dt = mx.bool_ if dtype == "bool" else getattr(mx, dtype)
        x = arrays[k] if is_main() else mx.zeros(shape, dtype=dt)
        if dt == mx.bool_:
            out[k] = all_sum(x.astype(mx.uint8)).astype(mx.bool_)
        else:
            out[k] = all_sum(x)
        mx.eval(out[k])
    return out


def broadcast_from(owner: int, arrays: list[mx.array]) -> list[mx.array]:
    """`owner`'s arrays on every rank; every rank passes arrays of the same shapes/dtypes."""
    if size() == 1:
        return arrays
    out = [all_sum(a if rank() == owner else mx.zeros_like(a)) for a in arrays]
    mx.eval(out)
    return out


def gather_rows(local: mx.array, n: int) -> mx.array:
    """The full [n, ...] array from every rank's `shard_range(n)` rows (in rank order)."""
    if size() == 1:
        return local
    w = size()
    rows = -(-n // w)  # all_gather needs equal shapes: pad every shard to ceil(n / W)
    pad = rows - local.shape[0]
    if pad:
        local = mx.concatenate([local, mx.zeros((pad, *local.shape[1:]), dtype=local.dtype)])
    full = mx.distributed.all_gather(local, stream=mx.cpu)
    base, extra = divmod(n, w)
    parts = [full[r * rows : r * rows + base + (1 if r < extra else 0)] for r in range(w)]
    out = mx.concatenate(parts, axis=0)
    mx.eval(out)
    return out


def average_gradients(grads, weight: float, total: float):
    """Gradients of the global loss sum_r (weight_r / total) * loss_r, where loss_r is this
    rank's mean over its `weight` items: mlx's average_gradients of weight*W/total * g."""
    if size() == 1:
        return grads
    from mlx.nn.utils import average_gradients as mlx_average

    scale = weight * size() / total
    if scale != 1.0:
        grads = tree_map(lambda g: g * scale, grads)
    return mlx_average(grads)


def reduce_step(loss: mx.array, metrics: dict, n_tok: float, grads):
    """A training step's per-token-mean loss, metrics and gradients over all ranks' shards,
    weighted by tokens exactly as one process computes them on the whole batch."""
    if size() == 1:
        return (loss, metrics, n_tok), grads
    keys = sorted(metrics)
    mx.eval(loss, grads, *metrics.values())
    w = float(n_tok)
    tot = sum_floats(w, float(loss) * w, *[float(metrics[k]) * w for k in keys])
    total = max(tot[0], 1.0)
    grads = average_gradients(grads, w, total) if tot[0] > 0 else average_gradients(grads, 1, size())
    return (mx.array(tot[1] / total), {k: tot[2 + i] / total for i, k in enumerate(keys)},
            tot[0]), grads
