"""Short model names -> Hugging Face repos and their default recipes."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpeedQError

MODELS = {
    "internvl2-1b": "OpenGVLab/InternVL2-1B",
    "internvl2.5-1b": "OpenGVLab/InternVL2_5-1B",
    "internvl3-1b": "OpenGVLab/InternVL3-1B",
    "internvl3-2b": "OpenGVLab/InternVL3-2B",
}


# Models built on this machine, no download: name -> builder(out_dir).
BUILT_MODELS = {
    "tiny-random": "speedq_mlx.model.synthetic:build_tiny_checkpoint",
}
# Models that ship inside the package with their data (assets/<name>/: model/, images/,
# conversations.jsonl, vqa_test.jsonl), e.g. tiny-shapes (built by devkit/tiny_shapes/).
BUNDLED_MODELS = ("tiny-shapes",)
LOCAL_MODELS = (*BUILT_MODELS, *BUNDLED_MODELS)
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def user_cache(kind: str) -> Path:
    """$SPEEDQ_CACHE/<kind> (default ~/.cache/speedq-mlx/<kind>): built models, datasets."""
    return Path(os.environ.get("SPEEDQ_CACHE", Path.home() / ".cache" / "speedq-mlx")) / kind


def bundled_data(name: str | None) -> dict | None:
    """The data a bundled model ships with ({"images", "data", "vqa"} paths), else None
    (also for an existing folder of that name: a folder wins over a name, as in resolve_source)."""
    if name is None or name.lower() not in BUNDLED_MODELS or Path(name).expanduser().is_dir():
        return None
    root = ASSETS / name.lower()
    return {"images": root / "images" / "train", "data": root / "conversations.jsonl",
            "vqa": root / "vqa_test.jsonl"}


def local_model(name: str) -> Path:
    """A bundled model's folder, or a BUILT_MODELS entry built into the user cache once."""
    import importlib

    if name in BUNDLED_MODELS:
        folder = ASSETS / name / "model"
        if not (folder / "config.json").is_file():
            raise SpeedQError(f"{name} is missing from this installation ({folder}); reinstall "
                              "speedq-mlx (or, in a clone, rebuild it with python -m devkit.tiny_shapes.train)")
        return folder
    out = user_cache("models") / name
    if not (out / "config.json").is_file():
        module, func = BUILT_MODELS[name].split(":")
        tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
        getattr(importlib.import_module(module), func)(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return out


def recipes_dir() -> Path:
    """Recipes ship inside the wheel (speedq_mlx/recipes) or sit at the repo root."""
    package = Path(__file__).resolve().parents[1]
    for cand in (package / "recipes", package.parent / "recipes"):
        if cand.is_dir():
            return cand
    raise SpeedQError("recipe folder not found (reinstall speedq-mlx)")


def default_recipe(name: str | None, bits: int | None) -> Path:
    """recipes/<name>-w<bits>.toml when it exists, else recipes/default.toml."""
    folder = recipes_dir()
    if name is not None and bits is not None:
        cand = folder / f"{name}-w{bits}.toml"
        if cand.is_file():
            return cand
    return folder / "default.toml"


def hub_id(name: str) -> str:
    """The repo id of a registered short name; unknown names list the known ones."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        known = ", ".join([*MODELS, *LOCAL_MODELS])
        raise SpeedQError(
            f"unknown model name {name!r}; known names: {known} "
            "(or pass a Hugging Face repo id like OpenGVLab/InternVL2-1B, or a local folder)"
        ) from None
