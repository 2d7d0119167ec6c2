"""Recipes: TOML files that say how each component is quantized and how stages train.

[quant] holds the default bits / group_size of the vision, projector and language
linears; [quant.<component>] (vision, projector, language, embeddings, lm_head)
overrides one component, and [quant.overrides] maps module-path globs to a setting
or "none" (keep float). Later stages read their own sections ([stage1], ...). A recipe
may start from another (`base = "file.toml"`) and change only what differs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from ..errors import SpeedQError
from .format import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

COMPONENTS = ("vision", "projector", "language", "embeddings", "lm_head")
# Components that follow [quant] bits/group_size (and the CLI's --bits/--group-size).
MAIN_COMPONENTS = ("vision", "projector", "language")


def load_recipe(path: Path, _chain: tuple = ()) -> dict:
    """Parse and validate a recipe file; errors name the file and the bad key.

    `base = "other.toml"` (a path relative to the recipe) starts from that recipe: its
    tables are merged key by key, and this file's values win."""
    path = Path(path)
    if not path.is_file():
        raise SpeedQError(f"recipe file not found: {path}" + (f" (base of {_chain[-1]})" if _chain else ""))
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpeedQError(f"cannot parse recipe {path}: {e}") from None
    base = recipe.pop("base", None)
    if base is not None:
        if path.resolve() in _chain:
            raise SpeedQError(f"recipe {path}: its base chain comes back to itself")
        parent = load_recipe(path.parent / base, (*_chain, path.resolve()))
        parent.pop("path")
        recipe = merged(parent, recipe)
    quant = recipe.get("quant", {})
    allowed = {"bits", "group_size", "overrides", *COMPONENTS}
    unknown = set(quant) - allowed
    if unknown:
        raise SpeedQError(
            f"recipe {path}: unknown key(s) in [quant]: {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    recipe["path"] = str(path)
    return recipe


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, tables merged recursively."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_format_flags(bits: int | None, group_size: int | None) -> None:
    """--bits / --group-size values MLX's affine format cannot hold, refused before any work."""
    if bits is not None and bits not in SUPPORTED_BITS:
        raise SpeedQError(f"--bits {bits} is not supported by MLX affine quantization "
                          f"(choose one of {', '.join(map(str, SUPPORTED_BITS))})")
    if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise SpeedQError(f"--group-size {group_size} is not supported by MLX affine quantization "
                          f"(choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))})")


def _checked(bits: int, group: int, where: str) -> tuple[int, int]:
    if bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUP_SIZES:
        raise SpeedQError(f"{where}: bits = {bits}, group_size = {group} is not supported by MLX "
                          f"affine quantization (bits {', '.join(map(str, SUPPORTED_BITS))}; "
                          f"group_size {', '.join(map(str, SUPPORTED_GROUP_SIZES))})")
    return bits, group


def parse_setting(value, where: str):
    """A {bits, group_size} table -> (bits, group_size); "none" / false -> None."""
    if value in ("none", False, None):
        return None
    if isinstance(value, dict) and set(value) <= {"bits", "group_size"} and "bits" in value:
        if value["bits"] in ("none", 0):
            return None
        return _checked(int(value["bits"]), int(value.get("group_size", 64)), where)
    raise SpeedQError(f"{where}: expected {{bits = N, group_size = G}} or \"none\", got {value!r}")


def component_settings(recipe: dict, bits: int | None = None, group_size: int | None = None) -> dict:
    """component -> (bits, group_size) or None.

    CLI bits/group_size replace [quant]'s defaults; explicit [quant.<component>] tables win.
    """
    check_format_flags(bits, group_size)
    quant = recipe.get("quant", {})
    base_bits = bits if bits is not None else quant.get("bits", 4)
    base_group = group_size if group_size is not None else quant.get("group_size", 64)
    where = recipe.get("path", "recipe")
    out = {}
    for comp in COMPONENTS:
        if comp in quant:
            out[comp] = parse_setting(quant[comp], f"{where} [quant.{comp}]")
        elif comp in MAIN_COMPONENTS:
            out[comp] = _checked(int(base_bits), int(base_group), f"{where} [quant]")
        else:
            out[comp] = (4, 32)
    return out


def overrides(recipe: dict) -> dict:
    """module-path glob -> (bits, group_size) or None, in file order."""
    raw = recipe.get("quant", {}).get("overrides", {})
    return {pat: parse_setting(v, f"{recipe.get('path', 'recipe')} [quant.overrides] {pat!r}")
            for pat, v in raw.items()}
