"""Which module gets which quantization: components, recipe settings, overrides.

A plan maps every quantizable module path (nn.Linear / nn.Embedding) to
(bits, group_size) or None (kept in float). It is built and validated before any
work starts, so a bad setting fails in one line before anything is written.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import mlx.nn as nn

from ..errors import SpeedQError
from . import format as Q
from .layers import FakeQuant, fake_quant_module


def component_of(path: str) -> str | None:
    """The recipe component a module path belongs to (None: not a quantization target)."""
    if path.startswith("vision_model."):
        return "vision"
    if path.startswith("mlp1."):
        return "projector"
    if path == "language_model.lm_head":
        return "lm_head"
    if path == "language_model.model.embed_tokens":
        return "embeddings"
    if path.startswith("language_model."):
        return "language"
    return None


def quantizable_modules(model: nn.Module) -> dict:
    """path -> module for every nn.Linear / nn.Embedding (float or already fake-quantized)."""
    return {p: m for p, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, FakeQuant))
            and component_of(p) is not None}


def build_plan(model: nn.Module, settings: dict, overrides: dict | None = None) -> dict:
    """path -> (bits, group_size) | None, validated against each module's input dimension."""
    plan = {}
    for path, module in sorted(quantizable_modules(model).items()):
        setting = settings.get(component_of(path))
        for pattern, value in (overrides or {}).items():
            if fnmatchcase(path, pattern):
                setting = value
        if setting is not None:
            bits, group = setting
            try:
                Q.check_format(bits, group, module.weight.shape[-1], name=path)
            except Q.QuantFormatError as e:
                raise SpeedQError(
                    f"{e}; refusing to run (set a smaller group_size, or "
                    f"\"{path}\" = \"none\" under [quant.overrides] to keep it in float)"
                ) from None
        plan[path] = setting
    return plan


def select(plan: dict, *components: str) -> dict:
    """The part of a plan whose modules belong to `components` (see component_of)."""
    return {p: s for p, s in plan.items() if component_of(p) in components}


def apply_plan(model: nn.Module, plan: dict, scale_dtype=None, learn_qparams=False,
               latent_dtype=None) -> list[str]:
    """Swap every planned module that is still float for its fake-quantized twin (min/max
    initialised), in place; modules a stage already quantized are left as they are.

    `latent_dtype` casts the latent weights (stage 3 trains them in fp32 whatever the
    compute dtype). Returns the paths swapped."""
    modules = dict(model.named_modules())
    updates = []
    for path, setting in plan.items():
        if setting is None or isinstance(modules[path], FakeQuant):
            continue
        bits, group = setting
        updates.append((path, fake_quant_module(modules[path], bits, group, latent_dtype,
                                                scale_dtype=scale_dtype,
                                                learn_qparams=learn_qparams)))
    if updates:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(updates))
    return [p for p, _ in updates]


def quantized_paths(model: nn.Module) -> list[str]:
    """Paths of modules that are already fake-quantized (e.g. by a SPEED-Q stage)."""
    return [p for p, m in model.named_modules() if isinstance(m, FakeQuant)]
