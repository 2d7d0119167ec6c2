"""The full-precision teacher's side of distillation: its top-k next-token
log-probabilities cached on disk (so it need not stay in memory during QAT) and CAKLD's
gamma, the teacher's mean confidence."""

from __future__ import annotations

import gc
from typing import Callable

import mlx.core as mx

from ..model.forward import logits as vlm_logits
from ..model.forward import row_logits
from ..train import distributed as dist
from . import losses as L


class Teacher:
    """The full-precision model: loaded when a stage first asks for it, and released when no
    stage needs it any more (stage 3 with a cached teacher keeps only its top-k: on a 0.5B
    language model that is 2.5 GB of fp32 weights not held during QAT)."""

    def __init__(self, load: Callable):
        self._load, self._model = load, None

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def release(self) -> None:
        self._model = None
        gc.collect()
        mx.clear_cache()


def _topk(teacher, sample, k: int, image_token: int) -> tuple[mx.array, mx.array]:
    lg = vlm_logits(teacher, mx.array([sample.input_ids]), sample.pixel_values, image_token)
    idx, lp = L.teacher_topk(lg[0], k)
    out = (idx, lp.astype(mx.float32))
    mx.eval(out)
    return out


def teacher_topk_cache(teacher: Teacher, samples: list, k: int, folder, image_token: int,
                       name: str = "teacher_topk") -> list:
    """The teacher's top-k (indices, log-probs) per sample, computed once into the run folder
    (`name`/<i>.safetensors); a re-run (resume) reads the files instead.

    Under a launcher the missing samples are split over the ranks; every rank ends with
    all of them in memory and rank 0 alone writes (and reads) the files."""
    from tqdm import tqdm

    main, cache = dist.is_main(), folder.file(name)
    if main:
        cache.mkdir(parents=True, exist_ok=True)
    todo = dist.broadcast_json([i for i in range(len(samples))
                                if not (cache / f"{i}.safetensors").is_file()] if main else None)
    local = {}
    for i in tqdm(todo[dist.rank()::dist.size()], desc="teacher top-k", unit="sample",
                  disable=not (todo and main)):
        local[i] = _topk(teacher.model, samples[i], k, image_token)
        if dist.size() == 1:  # kept as it comes: an interrupted run keeps what it computed
            _save(cache, i, local[i])
    for pos, i in enumerate(todo if dist.size() > 1 else ()):  # each from the rank that made it
        n = len(samples[i].input_ids)
        mine = local.get(i, (mx.zeros((n, k), dtype=mx.int32), mx.zeros((n, k), dtype=mx.float32)))
        local[i] = tuple(dist.broadcast_from(pos % dist.size(), list(mine)))
        if main:
            _save(cache, i, local[i])
    out = []
    for i in range(len(samples)):
        if i not in local:  # cached by an earlier run: rank 0 reads, the others receive
            t = folder.read_arrays(f"{name}/{i}.safetensors")
            local[i] = (t["idx"], t["logp"])
        out.append(local.pop(i))
    return out


def _save(cache, i: int, topk: tuple) -> None:
    mx.save_safetensors(str(cache / f"{i}.safetensors"), {"idx": topk[0], "logp": topk[1]})


def estimate_gamma(teacher, get_batch, n_batches: int, image_token: int) -> float:
    """CAKLD's gamma: the teacher's mean top-1 probability on answer tokens (under a
    launcher, of every rank's shard of the first n_batches batches)."""
    total = count = 0.0
    for step in range(n_batches):
        batch = get_batch(step)
        for b in batch if isinstance(batch, list) else [batch]:  # micro-batches or one batch
            t = b.get("teacher")
            if t is None:
                t = row_logits(teacher.model, b["input_ids"], b["pixel_values"], image_token, b["rows"][:2])
            s, n = L.confidence_rows(t)
            total, count = total + s, count + n
    total, count = dist.sum_floats(total, count) if dist.size() > 1 else (total, count)
    return total / max(count, 1.0)
