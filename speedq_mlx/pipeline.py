"""quantize: CLI arguments -> recipe -> model -> method -> export, in that order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import model_io
from .errors import SpeedQError
from .export import check_output, write_artifact
from .plan import apply_plan, build_plan
from .recipe import component_settings, load_recipe, overrides
from .registry import default_recipe

METHODS = ("rtn",)


@dataclass
class QuantizeArgs:
    model: str
    output: Path
    bits: int | None = None
    group_size: int | None = None
    method: str = "rtn"
    recipe: Path | None = None
    dtype: str = "float16"
    compute_dtype: str = "float32"
    overwrite: bool = False


def quantize(args: QuantizeArgs, log=print) -> Path:
    """Run the whole job; every input is checked before the first byte is written."""
    if args.method not in METHODS:
        raise SpeedQError(f"unknown method {args.method!r} (available: {', '.join(METHODS)})")
    out_dtype = model_io.parse_dtype(args.dtype)
    compute_dtype = model_io.parse_dtype(args.compute_dtype)
    check_output(args.output, args.overwrite)
    source, name = model_io.resolve_source(args.model)
    recipe_path = args.recipe or default_recipe(name, args.bits)
    recipe = load_recipe(recipe_path)
    settings = component_settings(recipe, args.bits, args.group_size)
    config = model_io.read_config(source)
    tokenizer = model_io.load_tokenizer(source)
    image_token = model_io.image_token_id(tokenizer)
    t0 = time.time()
    log(f"loading {source} ({args.compute_dtype})")
    model = model_io.load_model(source, compute_dtype, image_token)
    plan = build_plan(model, settings, overrides(recipe))
    log(f"recipe {recipe_path}: " + ", ".join(
        f"{c}={'float' if s is None else f'{s[0]}-bit g{s[1]}'}" for c, s in settings.items()))
    apply_plan(model, plan, scale_dtype=out_dtype)
    log(f"writing {args.output}")
    write_artifact(args.output, model, plan, config, tokenizer, dtype=out_dtype,
                   overwrite=args.overwrite,
                   card_info={"source": args.model, "method": args.method,
                              "recipe_path": str(recipe_path)})
    log(f"done in {time.time() - t0:.1f}s")
    return Path(args.output)
