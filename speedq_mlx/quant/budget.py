"""Fit a size budget: choose every module's (bits, group_size) or float so that the artifact
fits, at the least estimated damage.

Sizes are exact for what export writes (export/artifact.py): a module quantized at
(bits, group) is n * bits / 8 bytes of packed codes plus 2 * (n / group) scales and biases
in the output dtype; a float one n * dtype bytes (n = its weight's parameters). A linear's
bias, norms, position embeddings and every other parameter stay float: the fixed part.

`--target-bpw` is bits per weight as `speedq-mlx inspect` reports it over the quantizable
components (vision, projector, language, embeddings, lm_head): 8 * their bytes (packed
codes, scales, biases, float matrices, and their layers' float biases) / their parameters
(weights and those biases).

The choice is a multiple-choice knapsack (one setting per module; damages add up, bytes
add up). It is solved by a Lagrangian sweep - for a price lambda every module takes
argmin damage + lambda * bytes, which is exactly optimal for the size it lands on - with
lambda bisected to the smallest price whose plan fits, then a greedy fill that spends the
bytes left over on the upgrades with the most damage saved per byte; and, since the sweep
can only land on its price steps (coarse when modules are few), also by an exact dynamic
programme over bytes rounded to 1/200 of the budget per module, greedily filled the same
way. The plan with less damage wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import SpeedQError
from .format import is_representable
from .plan import component_of

CANDIDATE_BITS = (2, 3, 4, 6, 8)
CANDIDATE_GROUPS = (32, 64, 128)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}
# Artifact bytes that are neither weights nor the support files: JSON per tensor in the
# safetensors header and per module in config.json (bounds), the model card and its plot.
HEADER_BYTES_PER_TENSOR = 100
CONFIG_BYTES_PER_MODULE = 2 * 100  # "quantization" and "quantization_config" entries
CARD_BYTES = 8_000 + 48_000        # README.md text and the bits-per-layer PNG (measured <= 30 kB)
CARD_BYTES_PER_MODULE = 120


@dataclass
class Layout:
    """Shapes that decide sizes: quantizable weight [out, in] per module path, the float
    biases of those modules, and every other parameter (name -> count)."""

    modules: dict
    biases: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)

    def n(self, path: str) -> int:
        out_dims, in_dims = self.modules[path]
        return out_dims * in_dims

    def bias_params(self) -> int:
        return sum(self.biases.values())

    def weight_params(self) -> int:
        return sum(self.n(p) for p in self.modules)


@dataclass
class Target:
    kind: str      # "size" (bytes of the artifact folder) or "bpw"
    value: float
    text: str      # as the user wrote it

    def describe(self, amount: float) -> str:
        return f"{amount / 1e6:.2f} MB" if self.kind == "size" else f"{amount:.3f} bits/weight"


def parse_size(text: str) -> int:
    """'315MB' -> 315000000 (kB/MB/GB powers of 1000, KiB/MiB/GiB of 1024, bare: bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise SpeedQError(f"--target-size {text!r}: expected a size like 315MB, 1.2GB, 800kB, "
                          "300MiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def target_of(size: str | None, bpw: float | None) -> Target | None:
    if size is not None:
        return Target("size", parse_size(size), str(size))
    if bpw is not None:
        if not 0 < bpw <= 32:
            raise SpeedQError(f"--target-bpw must be a positive number of bits, got {bpw}")
        return Target("bpw", float(bpw), str(bpw))
    return None


def candidates(in_dims: int) -> list:
    """Settings a module may take: float (None) and every bits x group that MLX's format
    holds for in_dims (format.check_format is the rule)."""
    return [None] + [(b, g) for b in CANDIDATE_BITS for g in CANDIDATE_GROUPS if is_representable(b, g, in_dims)]


def module_bytes(n: int, setting, dtype_bytes: int) -> int:
    """Bytes export writes for an n-parameter weight at `setting` (None: float)."""
    if setting is None:
        return n * dtype_bytes
    bits, group = setting
    return n * bits // 8 + 2 * (n // group) * dtype_bytes


def layout_from_model(model) -> Layout:
    from mlx.utils import tree_flatten

    from .plan import quantizable_modules

    mods = quantizable_modules(model)
    shapes = {p: tuple(m.weight.shape) for p, m in mods.items()}
    biases = {p: m.bias.size for p, m in mods.items() if "bias" in m}
    planned = {f"{p}.weight" for p in mods} | {f"{p}.bias" for p in biases}
    other = {k: v.size for k, v in tree_flatten(model.parameters()) if k not in planned}
    return Layout(shapes, biases, other)


def layout_from_header(header: dict, config: dict) -> Layout:
    """The same layout from a checkpoint's safetensors header, before any weight is loaded
    (a tied lm_head, which the model does not have, is left out)."""
    tied = config.get("llm_config", {}).get("tie_word_embeddings", False)
    shapes, biases, other = {}, {}, {}
    for name, info in header.items():
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(info["shape"]) == 2 and component_of(path) is not None:
            if not (tied and path == "language_model.lm_head"):
                shapes[path] = tuple(info["shape"])
    for name, info in header.items():
        path, _, leaf = name.rpartition(".")
        count = math.prod(info["shape"])
        if path in shapes and leaf == "bias":
            biases[path] = count
        elif not (path in shapes and leaf == "weight") and path != "language_model.lm_head":
            other[name] = count
    return Layout(shapes, biases, other)


def overhead_bytes(layout: Layout) -> int:
    """A bound on the artifact's bytes beyond weights and support files (see the constants)."""
    names = [*layout.other, *(f"{p}.weight" for p in layout.modules), *(f"{p}.bias" for p in layout.biases)]
    header = sum(len(n) + HEADER_BYTES_PER_TENSOR for n in names)
    header += sum(2 * (len(p) + 8 + HEADER_BYTES_PER_TENSOR) for p in layout.modules)  # scales, biases
    config = sum(len(p) + CONFIG_BYTES_PER_MODULE for p in layout.modules)
    return header + config + CARD_BYTES + CARD_BYTES_PER_MODULE * len(layout.modules) + 8


def fixed_bytes(layout: Layout, dtype_bytes: int, files_bytes: int) -> int:
    """The artifact's bytes that no plan changes: float parameters outside the plan, the
    planned modules' biases, support files and overhead."""
    params = sum(layout.other.values()) + layout.bias_params()
    return params * dtype_bytes + files_bytes + overhead_bytes(layout)


def weight_budget(target: Target, layout: Layout, dtype_bytes: int, files_bytes: int) -> int:
    """Bytes the quantizable weight matrices may take under `target`."""
    if target.kind == "size":
        return int(target.value) - fixed_bytes(layout, dtype_bytes, files_bytes)
    total = layout.weight_params() + layout.bias_params()
    return int(target.value / 8 * total) - layout.bias_params() * dtype_bytes


def in_target_units(target: Target, weight_bytes: int, layout: Layout, dtype_bytes: int,
                    files_bytes: int) -> float:
    """The inverse of weight_budget: artifact bytes, or bits/weight, of a plan's weight bytes."""
    if target.kind == "size":
        return weight_bytes + fixed_bytes(layout, dtype_bytes, files_bytes)
    total = layout.weight_params() + layout.bias_params()
    return 8 * (weight_bytes + layout.bias_params() * dtype_bytes) / total


def options(layout: Layout, dtype_bytes: int, fixed: dict, damages: dict | None = None) -> dict:
    """path -> [(setting, bytes, damage)]: one option for a fixed module (its setting), every
    candidate for the others (damage 0 where none is known)."""
    out = {}
    for path, (_, in_dims) in sorted(layout.modules.items()):
        settings = [fixed[path]] if path in fixed else candidates(in_dims)
        dmg = (damages or {}).get(path, {})
        out[path] = [(s, module_bytes(layout.n(path), s, dtype_bytes), float(dmg.get(s, 0.0)))
                     for s in settings]
    return out


def check_target(target: Target, layout: Layout, dtype_bytes: int, files_bytes: int,
                 fixed: dict) -> int:
    """The weight budget, or a one-line error naming the achievable range."""
    opts = options(layout, dtype_bytes, fixed)
    lo = sum(min(o[1] for o in v) for v in opts.values())
    hi = sum(max(o[1] for o in v) for v in opts.values())
    budget = weight_budget(target, layout, dtype_bytes, files_bytes)
    if not lo <= budget <= hi:
        flag = "--target-size" if target.kind == "size" else "--target-bpw"
        lo_t, hi_t = (in_target_units(target, b, layout, dtype_bytes, files_bytes) for b in (lo, hi))
        kept = f"; {len(fixed)} modules kept at the recipe's settings" if fixed else ""
        raise SpeedQError(f"{flag} {target.text} cannot be met: achievable range "
                          f"{target.describe(lo_t)} (every module 2-bit, largest group) to "
                          f"{target.describe(hi_t)} (every module float){kept}")
    return budget


def lagrangian(opts: dict, lam: float) -> dict:
    """path -> option index minimising damage + lam * bytes (ties: fewer bytes)."""
    return {p: min(range(len(v)), key=lambda i: (v[i][2] + lam * v[i][1], v[i][1]))
            for p, v in opts.items()}


def total(opts: dict, choice: dict, what: int) -> float:
    return sum(opts[p][i][what] for p, i in choice.items())


def solve(opts: dict, budget: int) -> tuple[dict, float]:
    """(path -> option index, lambda): least total damage with total bytes <= budget - the
    better of the Lagrangian sweep and the rounded dynamic programme, each greedily filled."""
    by_price, lam = lagrangian_solve(opts, budget)
    by_table = greedy_fill(opts, table_solve(opts, budget), budget)
    return min((by_price, by_table), key=lambda c: total(opts, c, 2)), lam


def lagrangian_solve(opts: dict, budget: int) -> tuple[dict, float]:
    """The smallest price lambda whose argmin plan fits (bisected), then a greedy fill."""
    choice, lam = lagrangian(opts, 0.0), 0.0
    if total(opts, choice, 1) > budget:
        lo, hi = -40.0, 10.0  # log10 of lambda (nats per byte)
        choice = lagrangian(opts, 10.0 ** hi)
        if total(opts, choice, 1) > budget:  # damages all tied: the smallest option everywhere
            choice = {p: min(range(len(v)), key=lambda i: v[i][1]) for p, v in opts.items()}
        for _ in range(100):
            mid = (lo + hi) / 2
            trial = lagrangian(opts, 10.0 ** mid)
            if total(opts, trial, 1) <= budget:
                hi, choice = mid, trial
            else:
                lo = mid
        lam = 10.0 ** hi
    return greedy_fill(opts, choice, budget), lam


def table_solve(opts: dict, budget: int, per_module: int = 200) -> dict:
    """The exact knapsack over bytes rounded up to units of budget / (per_module * modules):
    it fits, and it is at least as good as any plan within budget - modules * unit (under 0.5%
    of the budget). The Lagrangian misses plans between its price steps, which on a few
    modules can double the damage."""
    import numpy as np

    paths = list(opts)
    unit = max(1, -(-budget // (per_module * max(len(paths), 1))))
    cap = budget // unit
    best = np.zeros(cap + 1)  # least damage of the modules so far within c units
    picks = []
    for p in paths:
        new, pick = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=np.int16)
        for i, (_, nbytes, dmg) in enumerate(opts[p]):
            w = -(-nbytes // unit)
            if w <= cap:
                cand = np.full(cap + 1, np.inf)
                cand[w:] = best[: cap + 1 - w] + dmg
                better = cand < new
                new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    choice, c = {}, cap
    for p, pick in zip(reversed(paths), reversed(picks)):
        choice[p] = int(pick[c])
        c -= -(-opts[p][choice[p]][1] // unit)
    return choice


def greedy_fill(opts: dict, choice: dict, budget: int) -> dict:
    """Spend the bytes left under the budget: repeatedly take the change that saves the most
    damage per extra byte and still fits."""
    choice = dict(choice)
    left = budget - total(opts, choice, 1)
    while True:
        best, best_rate = None, 0.0
        for p, v in opts.items():
            _, b0, d0 = v[choice[p]]
            for i, (_, b, d) in enumerate(v):
                if d < d0 and b - b0 <= left:
                    rate = (d0 - d) / max(b - b0, 1e-9)
                    if rate > best_rate:
                        best, best_rate = (p, i), rate
        if best is None:
            return choice
        p, i = best
        left -= opts[p][i][1] - opts[p][choice[p]][1]
        choice[p] = i


def setting_name(setting) -> str:
    return "float" if setting is None else f"{setting[0]}-bit g{setting[1]}"


def setting_fields(setting) -> dict:
    """{"bits", "group_size"} of a setting as plan.json writes it (null and null: float)."""
    return {"bits": None, "group_size": None} if setting is None else \
        {"bits": setting[0], "group_size": setting[1]}


def fit(layout: Layout, dtype_bytes: int, budget: int, fixed: dict, damages: dict) -> tuple[dict, dict]:
    """(plan, record): the least-damage settings within `budget` weight bytes, and what
    plan.json keeps of them (per module: setting, params, bytes, damage, every candidate)."""
    opts = options(layout, dtype_bytes, fixed, damages)
    choice, lam = solve(opts, budget)
    modules = {}
    for p, i in sorted(choice.items()):
        setting, nbytes, dmg = opts[p][i]
        modules[p] = {"component": component_of(p), **setting_fields(setting), "params": layout.n(p),
                      "bytes": nbytes, "damage": dmg, "fixed": p in fixed,
                      "candidates": {setting_name(s): {"bytes": b, "damage": d} for s, b, d in opts[p]}}
    plan = {p: opts[p][i][0] for p, i in choice.items()}
    record = {"lambda": lam, "weight_budget_bytes": budget, "weight_bytes": total(opts, choice, 1),
              "damage": total(opts, choice, 2), "modules": modules}
    return plan, record
