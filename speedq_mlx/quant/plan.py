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
        setting = setting_for(path, settings, overrides)
        check_setting(path, module, setting)
        plan[path] = setting
    return plan


def setting_for(path: str, settings: dict, overrides: dict | None = None):
    """The recipe's setting of one module: its component's, or the last override matching it."""
    setting = settings.get(component_of(path))
    for pattern, value in (overrides or {}).items():
        if fnmatchcase(path, pattern):
            setting = value
    return setting


def overridden(path: str, overrides: dict | None) -> bool:
    return any(fnmatchcase(path, pattern) for pattern in (overrides or {}))


def check_setting(path: str, module: nn.Module, setting, where: str = "") -> None:
    """A one-line SpeedQError when MLX's affine format cannot hold `setting` for this module."""
    if setting is None:
        return
    try:
        Q.check_format(*setting, module.weight.shape[-1], name=path)
    except Q.QuantFormatError as e:
        raise SpeedQError(
            f"{where}{e}; refusing to run (set a smaller group_size, or "
            f"\"{path}\" = \"none\" under [quant.overrides] to keep it in float)"
        ) from None


def read_plan_file(path, model: nn.Module, base: dict) -> tuple[dict, int]:
    """(`base` with the settings of a plan.json - written by a --target-size run, or by hand -
    checked as build_plan checks them, and how many modules it set): every entry of its
    "modules" needs "bits" and "group_size" (bits null or "none": float)."""
    import json
    from pathlib import Path

    from .recipe import parse_setting

    where = f"plan {path}: "
    try:
        entries = json.loads(Path(path).read_text()).get("modules")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SpeedQError(f"{where}not a readable plan file ({type(e).__name__})") from None
    if not isinstance(entries, dict):
        raise SpeedQError(f"{where}no \"modules\" object (path -> {{bits, group_size}})")
    modules, plan = quantizable_modules(model), dict(base)
    for name, entry in entries.items():
        if name not in modules:
            raise SpeedQError(f"{where}{name!r} is not a quantizable module of this model")
        if not isinstance(entry, dict) or "bits" not in entry:
            raise SpeedQError(f"{where}{name!r}: expected {{\"bits\": N, \"group_size\": G}}, got {entry!r}")
        fields = {k: entry[k] for k in ("bits", "group_size") if entry.get(k) is not None}
        try:
            setting = parse_setting(fields if fields.get("bits") is not None else "none", f"{where}{name!r}")
        except (TypeError, ValueError):
            raise SpeedQError(f"{where}{name!r}: bits and group_size must be integers, got {entry!r}") from None
        check_setting(name, modules[name], setting, where)
        plan[name] = setting
    return plan, len(entries)


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
