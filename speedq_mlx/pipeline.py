"""quantize: CLI arguments -> recipe -> model -> method -> export, in that order."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import distributed as dist
from . import model_io, registry
from .errors import SpeedQError
from .export import check_output, write_artifact
from .images import find_images
from .plan import apply_plan, build_plan, quantized_paths
from .vision_stage import Stage1Config, calibration_pixels, load_stage1, run_stage1
from .recipe import component_settings, load_recipe, overrides

METHODS = ("speedq", "rtn")
STAGES = (1, 2, 3)


@dataclass
class QuantizeArgs:
    model: str
    output: Path
    bits: int | None = None
    group_size: int | None = None
    method: str = "speedq"
    recipe: Path | None = None
    dtype: str = "float16"
    compute_dtype: str = "float32"
    overwrite: bool = False
    stages: str = "1,2,3"
    images: Path | None = None
    data: str | None = None
    text: Path | None = None
    image_root: Path | None = None
    max_samples: int | None = None
    max_length: int | None = 2048
    max_tiles: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    run_dir: Path | None = None
    resume: bool = False
    eval: object = None  # evaluate.EvalOptions: evaluate the artifact against the source at the end


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(sorted({int(s) for s in text.replace(" ", "").split(",") if s}))
    except ValueError:
        raise SpeedQError(f"--stages takes a comma list like 1,2,3 (got {text!r})") from None
    missing = [s for s in stages if s not in STAGES]
    if not stages or missing:
        raise SpeedQError(f"stage(s) {missing or text} not available (implemented: "
                          f"{', '.join(map(str, STAGES))})")
    return stages


def default_run_dir(output: Path) -> Path:
    """Checkpoints and reports live beside the artifact: runs/<artifact name>."""
    return Path(output).parent / "runs" / Path(output).name


def quantize(args: QuantizeArgs, log=print) -> Path:
    """Run the whole job; every input is checked before the first byte is written."""
    if not dist.is_main():  # under mlx.launch: every rank trains, rank 0 alone reports and writes
        log = lambda *a, **k: None  # noqa: E731
    if args.method not in METHODS:
        raise SpeedQError(f"unknown method {args.method!r} (available: {', '.join(METHODS)})")
    if not 0 <= args.val_fraction < 1:
        raise SpeedQError(f"--held-out must be in [0, 1), got {args.val_fraction}")
    out_dtype = model_io.parse_dtype(args.dtype)
    compute_dtype = model_io.parse_dtype(args.compute_dtype)
    check_output(args.output, args.overwrite)
    stages = parse_stages(args.stages) if args.method == "speedq" else ()
    bundle = registry.bundled_data(args.model)
    if bundle and stages and args.images is None and args.data is None:
        args = replace(args, images=bundle["images"], data=str(bundle["data"]))
        log(f"data: the images and conversations bundled with {args.model} ({bundle['data'].parent})")
    image_paths = None
    if args.data and not str(args.data).startswith("hf:") and not Path(args.data).is_file():
        raise SpeedQError(f"data file not found: {args.data}")
    if args.text and not Path(args.text).exists():
        raise SpeedQError(f"text file not found: {args.text}")
    if 1 in stages:
        if args.images is None:
            raise SpeedQError("stage 1 needs calibration images: pass --images DIR")
        image_paths = find_images(args.images)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.output)
    if dist.is_main() and args.overwrite and not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    source, name = model_io.resolve_source(args.model)
    recipe_path = args.recipe or registry.default_recipe(name, args.bits)
    recipe = load_recipe(recipe_path)
    settings = component_settings(recipe, args.bits, args.group_size)
    dist.check_batches(recipe, stages)  # under mlx.launch: batches must split over the ranks
    config = model_io.read_config(source)
    tokenizer = model_io.load_tokenizer(source)
    image_token = model_io.image_token_id(tokenizer)
    t0 = time.time()
    log(f"loading {source} ({args.compute_dtype})")
    model = model_io.load_model(source, compute_dtype, image_token)
    plan = build_plan(model, settings, overrides(recipe))
    log(f"recipe {recipe_path}: " + ", ".join(
        f"{c}={'float' if s is None else f'{s[0]}-bit g{s[1]}'}" for c, s in settings.items()))
    stage1_cfg = Stage1Config.from_recipe(recipe) if 1 in stages else None
    if 1 in stages:
        pixels = calibration_pixels(config, image_paths, stage1_cfg, compute_dtype)
        run_stage1(model, plan, pixels, stage1_cfg, run_dir, resume=args.resume,
                   scale_dtype=out_dtype, log=log)
    elif stages and load_stage1(model, plan, run_dir, out_dtype):
        log(f"stage 1: using the quantized vision tower in {run_dir / 'stage1'}")
    # stages 2 and 3 train against the quantized vision tower, whichever way it was made
    done = set(quantized_paths(model))
    apply_plan(model, {p: s for p, s in plan.items() if p.startswith("vision_model.") and p not in done},
               scale_dtype=out_dtype)
    if {2, 3} & set(stages):
        run_stages_2_3(args, stages, model, plan, recipe, source, config, tokenizer, image_token,
                       compute_dtype, out_dtype, run_dir, log)
    if not dist.is_main():
        return Path(args.output)
    done = set(quantized_paths(model))
    apply_plan(model, {p: s for p, s in plan.items() if p not in done}, scale_dtype=out_dtype)
    log(f"writing {args.output}")
    card_info = {"source": args.model, "method": args.method, "recipe_path": str(recipe_path),
                 "stages": ",".join(map(str, stages)) or "-"}
    write_artifact(args.output, model, plan, config, tokenizer, dtype=out_dtype,
                   overwrite=args.overwrite, card_info=card_info)
    log(f"done in {time.time() - t0:.1f}s")
    if args.eval is not None:
        from .evaluate import eval_export

        del model  # the artifact and the source are loaded afresh
        eval_export(args.output, source, args.eval, card_info, run_dir, log)
    return Path(args.output)


def run_stages_2_3(args: QuantizeArgs, stages, model, plan, recipe, source, config, tokenizer,
                   image_token, compute_dtype, out_dtype, run_dir: Path, log) -> None:
    """Projector re-alignment (2) and language-model QAT with distillation (3)."""
    from . import data
    from .language_stage import StageConfig, run_stage2, run_stage3
    from .stage_data import calibration_batches, training_records

    cfg2 = StageConfig.from_recipe(recipe, "stage2", distill_weight=0.0)
    cfg3 = StageConfig.from_recipe(recipe, "stage3")
    teacher = model_io.load_model(source, compute_dtype, image_token)  # full precision, ViT too
    records = training_records(args.data, args.images, args.image_root, args.max_samples, teacher,
                               source, config, tokenizer, run_dir, args.seed, log)
    train_records, val_records = data.split(records, args.val_fraction, args.seed)
    enc = data.encoder(config, tokenizer, args.max_tiles)
    samples = [s for s in data.iter_samples(train_records, enc, args.max_length) if s is not None]
    if not samples:
        raise SpeedQError("no usable training samples (all skipped; see the messages above)")
    val_samples = [s for s in data.iter_samples(val_records, enc, args.max_length) if s is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"data: {len(samples)} training samples, {len(val_samples)} held out (each stage keeps "
        "its checkpoint with the lowest held-out loss)")
    if 2 in stages:
        run_stage2(model, teacher, samples, cfg2, run_dir, pad, image_token, args.resume, log,
                   val_samples)
    if 3 in stages:
        calib = calibration_batches(args.text, records, samples, tokenizer, config, pad,
                                    cfg3.clip_tokens, cfg3.clip_windows, seed=args.seed)
        run_stage3(model, teacher, plan, samples, calib, cfg3, run_dir, pad, image_token,
                   out_dtype, args.resume, log, val_samples)
    del teacher
