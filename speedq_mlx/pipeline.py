"""quantize: checks -> load -> plan -> stage 1 -> stage 2 -> stage 3 -> export (-> eval).

This is the one place that applies the quantization plan (`quant.plan.apply_plan`), in
this order: stage 1 learns the ViT blocks' rounding and the rest of the vision tower is
rounded to nearest; stage 2 re-aligns the float projector against that quantized tower
and the float language model; then the language model, projector, embeddings and lm_head
become fake-quantized, and stage 3 clip-initialises and trains them; whatever is still
float in the plan is rounded to nearest; the artifact is written.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from .blas import slow_blas_note
from .data.images import find_images
from .data.sources import (DataOptions, calibration_batches, sensitivity_batches, training_data,
                           with_text_windows)
from .errors import SpeedQError
from .evaluation.evaluate import EvalOptions
from .export.artifact import check_output, support_files_bytes, write_artifact
from .model import internvl
from .model import io as model_io
from .model import registry
from .quant import budget
from .quant.plan import (apply_plan, build_plan, component_of, overridden, read_plan_file, select,
                         setting_for)
from .quant.recipe import check_format_flags, component_settings, load_recipe, overrides
from .run import Run
from .stages.common import StageConfig
from .stages.stage1_vision import Stage1Config, calibration_pixels, load_stage1, run_stage1
from .stages.stage2_projector import run_stage2
from .stages.stage3_language import TRAINED, run_stage3
from .stages.teacher import Teacher
from .train import distributed as dist

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
    max_length: int | None = internvl.TRAINING_MAX_LENGTH
    max_tiles: int | None = None  # training samples: internvl.training_tiles
    val_fraction: float = 0.05
    seed: int = 0
    run_dir: Path | None = None
    resume: bool = False
    eval: EvalOptions | None = None  # evaluate the artifact against the source at the end
    target_size: str | None = None   # "315MB": fit the artifact folder in this size
    target_bpw: float | None = None  # bits per weight of the quantizable modules
    plan: Path | None = None         # a plan.json to use as it is
    sensitivity_windows: int = 8     # calibration text windows of the Fisher estimate
    sensitivity_tokens: int = 256
    sensitivity_images: int = 8

    def data_options(self) -> DataOptions:
        return DataOptions(data=self.data, images=self.images, image_root=self.image_root,
                           text=self.text, max_samples=self.max_samples, max_tiles=self.max_tiles,
                           max_length=self.max_length, held_out=self.val_fraction)


@dataclass
class Recipe:
    """A recipe file, parsed and checked: component settings and each stage's config."""

    path: Path
    raw: dict
    settings: dict
    stage1: Stage1Config | None
    stage2: StageConfig | None
    stage3: StageConfig | None

    def batches(self) -> dict:
        """{"stage1": global batch, ...} of the stages this run has."""
        out = {"stage1": self.stage1.batch} if self.stage1 else {}
        out.update({name: cfg.train.batch for name, cfg in (("stage2", self.stage2),
                                                            ("stage3", self.stage3)) if cfg})
        return out


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


def read_recipe(path: Path, args: QuantizeArgs, stages) -> Recipe:
    raw = load_recipe(path)
    settings = component_settings(raw, args.bits, args.group_size)
    return Recipe(Path(path), raw, settings,
                  Stage1Config.from_recipe(raw) if 1 in stages else None,
                  StageConfig.from_recipe(raw, "stage2", distill_weight=0.0) if 2 in stages else None,
                  StageConfig.from_recipe(raw, "stage3") if 3 in stages else None)


def check_inputs(args: QuantizeArgs, log) -> tuple[QuantizeArgs, tuple, list | None]:
    """Every check that needs no model: (args with a bundled model's data filled in, the
    stages to run, stage 1's calibration images)."""
    if args.method not in METHODS:
        raise SpeedQError(f"unknown method {args.method!r} (available: {', '.join(METHODS)})")
    if args.max_length is not None and args.max_length < 16:
        raise SpeedQError(f"--max-length must be at least 16 tokens, got {args.max_length}")
    if not 0 <= args.val_fraction < 1:
        raise SpeedQError(f"--held-out must be in [0, 1), got {args.val_fraction}")
    check_format_flags(args.bits, args.group_size)
    model_io.parse_dtype(args.dtype)
    model_io.parse_dtype(args.compute_dtype)
    check_output(args.output, args.overwrite)
    stages = parse_stages(args.stages) if args.method == "speedq" else ()
    bundle = registry.bundled_data(args.model)
    if bundle and (stages or budgeted(args)) and args.images is None and args.data is None:
        args = replace(args, images=bundle["images"], data=str(bundle["data"]))
        log(f"data: the images and conversations bundled with {args.model} ({bundle['data'].parent})")
    if args.data and not str(args.data).startswith("hf:") and not Path(args.data).is_file():
        raise SpeedQError(f"data file not found: {args.data}")
    if args.text and not Path(args.text).exists():
        raise SpeedQError(f"text file not found: {args.text}")
    check_budget_inputs(args)
    image_paths = None
    if 1 in stages:
        if args.images is None:
            raise SpeedQError("stage 1 needs calibration images: pass --images DIR")
        image_paths = find_images(args.images)
    return args, stages, image_paths


def quantize(args: QuantizeArgs, log=print) -> Path:
    """Run the whole job; every input is checked before the first byte is written."""
    if not dist.is_main():  # under mlx.launch: every rank trains, rank 0 alone reports and writes
        log = lambda *a, **k: None  # noqa: E731
    args, stages, image_paths = check_inputs(args, log)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.output)
    if dist.is_main() and args.overwrite and not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    source, name = model_io.resolve_source(args.model)
    recipe = read_recipe(args.recipe or registry.default_recipe(name, args.bits), args, stages)
    overrides(recipe.raw)  # every setting of the recipe is checked before the model loads
    if recipe.stage3 and recipe.stage3.text_windows and not args.text:
        raise SpeedQError(f"recipe {recipe.path}: [stage3] text_windows = {recipe.stage3.text_windows} "
                          "trains on --text windows; pass --text FILE (or set text_windows = 0)")
    dist.check_batches(recipe.batches())  # under mlx.launch: batches must split over the ranks
    run = Run.open(source, run_dir, args.resume, compute_dtype=model_io.parse_dtype(args.compute_dtype),
                   out_dtype=model_io.parse_dtype(args.dtype), seed=args.seed, log=log)
    note = slow_blas_note()
    if note and dist.is_main():
        print(note, file=sys.stderr)
    t0 = time.time()
    target = budget.target_of(args.target_size, args.target_bpw)
    if target is not None:  # an impossible budget is refused before the weights load
        header_layout = budget.layout_from_header(model_io.checkpoint_header(source), run.config)
        weight_budget(run, header_layout, recipe, target, bool(args.images or args.data))
    log(f"loading {source} ({args.compute_dtype})")
    model = model_io.load_model(source, run.compute_dtype, run.image_token)
    plan = build_plan(model, recipe.settings, overrides(recipe.raw))
    log(f"recipe {recipe.path}: " + ", ".join(
        f"{c}={'float' if s is None else f'{s[0]}-bit g{s[1]}'}" for c, s in recipe.settings.items()))
    plan, plan_note = choose_plan(run, model, plan, recipe, args, target)
    quantize_model(run, model, plan, recipe, stages, args.data_options(), image_paths)
    if not dist.is_main():
        return Path(args.output)
    log(f"writing {args.output}")
    card_info = {"source": args.model, "method": args.method, "recipe_path": str(recipe.path),
                 "stages": ",".join(map(str, stages)) or "-"}
    if plan_note:
        card_info.update(plan=plan, budget=plan_note)
    write_artifact(args.output, model, plan, run.config, run.tokenizer, dtype=run.out_dtype,
                   overwrite=args.overwrite, card_info=card_info)
    if target is not None:
        log(budget_outcome(Path(args.output), target))
    log(f"done in {time.time() - t0:.1f}s")
    if args.eval is not None:
        from .evaluation.evaluate import eval_export

        del model  # the artifact and the source are loaded afresh
        eval_export(args.output, source, args.eval, card_info, run_dir, log)
    return Path(args.output)


def quantize_model(run: Run, model, plan: dict, recipe: Recipe, stages: tuple,
                   opts: DataOptions, image_paths: list | None) -> None:
    """The stages and the plan, in order (see the module docstring); the model ends with
    every planned module fake-quantized."""
    if 1 in stages:
        pixels = calibration_pixels(run.config, image_paths, recipe.stage1, run.compute_dtype)
        run_stage1(run, model, plan, pixels, recipe.stage1)
    elif stages and load_stage1(run, model, plan):
        run.log(f"stage 1: using the quantized vision tower in {run.folder.file('stage1')}")
    apply_plan(model, select(plan, "vision"), scale_dtype=run.out_dtype)
    if {2, 3} & set(stages):
        teacher = Teacher(lambda: model_io.load_model(run.source, run.compute_dtype, run.image_token))
        text_only = 2 not in stages and bool(recipe.stage3.text_windows)
        data = training_data(run, opts, teacher, text_only)
        if 2 in stages:
            run_stage2(run, model, teacher, data, recipe.stage2)
        if 3 in stages:
            cfg = recipe.stage3
            calib = calibration_batches(run, opts.text, data, cfg.clip_tokens, cfg.clip_windows)
            data = with_text_windows(run, data, opts.text, cfg.text_windows, cfg.text_tokens, opts.held_out)
            prepare_stage3(model, plan, cfg, run.out_dtype)
            run_stage3(run, model, teacher, plan, data, calib, cfg)
        teacher.release()
    apply_plan(model, plan, scale_dtype=run.out_dtype)


def prepare_stage3(model, plan: dict, cfg: StageConfig, scale_dtype) -> None:
    """What stage 3 starts from: embeddings / lm_head frozen at their recipe bits (quantized
    once, before QAT), and the language and projector linears as the fake-quantized layers
    QAT trains (fp32 latent weights, min/max or learnable scales)."""
    apply_plan(model, select(plan, "embeddings", "lm_head"), scale_dtype=scale_dtype)
    apply_plan(model, select(plan, *TRAINED), scale_dtype=scale_dtype,
               learn_qparams=cfg.learn_qparams, latent_dtype=mx.float32)


# ------------------------------------------------------------- size budgets (quant/budget.py)


def budgeted(args: QuantizeArgs) -> bool:
    return args.target_size is not None or args.target_bpw is not None


def check_budget_inputs(args: QuantizeArgs) -> None:
    """--target-size, --target-bpw and --plan: at most one, well-formed; a budget needs
    calibration data for the sensitivity estimate."""
    given = [flag for flag, value in (("--target-size", args.target_size),
                                      ("--target-bpw", args.target_bpw), ("--plan", args.plan))
             if value is not None]
    if len(given) > 1:
        raise SpeedQError(f"{' and '.join(given)} are mutually exclusive: give a size, "
                          "bits per weight or a plan file")
    budget.target_of(args.target_size, args.target_bpw)
    if args.plan is not None and not Path(args.plan).is_file():
        raise SpeedQError(f"plan file not found: {args.plan}")
    if budgeted(args) and not (args.text or args.data):
        raise SpeedQError(f"{given[0]} measures each module's sensitivity on calibration data: "
                          "pass --text FILE (plain text) and/or --data FILE (conversations)")
    if budgeted(args) and (args.sensitivity_windows < 1 or args.sensitivity_tokens < 16
                           or args.sensitivity_images < 0):
        raise SpeedQError("--sensitivity-windows must be >= 1, --sensitivity-tokens >= 16 and "
                          "--sensitivity-images >= 0")


def fixed_modules(layout: budget.Layout, recipe: Recipe, with_images: bool) -> dict:
    """Modules the budget does not choose for, at the recipe's setting: those a
    [quant.overrides] glob names, and the vision tower and projector when no image data
    gives them a Fisher signal."""
    rules = overrides(recipe.raw)
    return {p: setting_for(p, recipe.settings, rules) for p in layout.modules
            if overridden(p, rules) or (not with_images and component_of(p) in ("vision", "projector"))}


def weight_budget(run: Run, layout: budget.Layout, recipe: Recipe, target, with_images: bool) -> tuple:
    """(weight bytes the budget allows, fixed modules, support-file bytes), or the one-line
    error naming the achievable range."""
    files = support_files_bytes(run.config, run.tokenizer, run.out_dtype)
    fixed = fixed_modules(layout, recipe, with_images)
    return budget.check_target(target, layout, run.out_dtype.size, files, fixed), fixed, files


def choose_plan(run: Run, model, plan: dict, recipe: Recipe, args: QuantizeArgs, target) -> tuple[dict, str]:
    """(the plan, a line for the model card; "" for a recipe's plan): --plan FILE as given,
    a budget fitted by sensitivity (reused from plan.json on --resume), or the recipe's."""
    if args.plan is not None:
        plan, n = read_plan_file(args.plan, model, plan)
        run.log(f"plan: {n} module settings from {args.plan}")
        return plan, f"Plan: `{Path(args.plan).name}` ({n} module settings)."
    if target is None:
        return plan, ""
    saved = run.folder.read_json("plan.json") if args.resume else None
    if saved and saved.get("budget", {}).get("target") == target.text:
        run.log(f"plan: reusing {run.folder.file('plan.json')}")
        return read_plan_file(run.folder.file("plan.json"), model, plan)[0], saved["budget"]["summary"]
    return budget_plan(run, model, plan, recipe, args, target)


def budget_plan(run: Run, model, plan: dict, recipe: Recipe, args: QuantizeArgs, target) -> tuple[dict, str]:
    """Sensitivity on calibration data, then the knapsack; plan.json goes to the run folder."""
    from .quant.sensitivity import damages, fisher_diagonal

    t0 = time.time()
    batches, n_img = sensitivity_batches(run, args.data_options(), args.sensitivity_windows,
                                         args.sensitivity_tokens, args.sensitivity_images)
    layout = budget.layout_from_model(model)
    allowed, fixed, files = weight_budget(run, layout, recipe, target, n_img > 0)
    if n_img == 0:
        run.log("sensitivity: no image data (--images, or --data with images): the vision tower and "
                "projector keep the recipe's settings, counted in the budget")
    free = [p for p in layout.modules if p not in fixed]
    fisher, n_tokens = fisher_diagonal(model, batches, free, run.image_token, run.seed)
    dmg = damages(model, fisher, {p: budget.candidates(layout.modules[p][1]) for p in free}, run.out_dtype)
    del fisher
    plan, record = budget.fit(layout, run.out_dtype.size, allowed, fixed, dmg)
    estimate = budget.in_target_units(target, record["weight_bytes"], layout, run.out_dtype.size, files)
    flag = "--target-size" if target.kind == "size" else "--target-bpw"
    summary = (f"Budget `{flag} {target.text}`: estimated {target.describe(estimate)}; estimated damage "
               f"{record['damage']:.4g} nats/token (diagonal Fisher on {n_tokens} calibration tokens, "
               f"{n_img} with an image), lambda {record['lambda']:.3g}.")
    run.folder.write_json("plan.json", {
        "format": "speedq-mlx plan 1",
        "budget": {"target": target.text, "kind": target.kind, "value": target.value, "estimate": estimate,
                   "dtype": model_io.dtype_name(run.out_dtype), "support_files_bytes": files,
                   "fixed_bytes": budget.fixed_bytes(layout, run.out_dtype.size, files), "summary": summary},
        "sensitivity": {"estimate": "diagonal Fisher, labels sampled from the full-precision model",
                        "batches": len(batches), "image_batches": n_img, "scored_tokens": n_tokens,
                        "seconds": round(time.time() - t0, 1)},
        **record}, indent=1)
    run.log(f"plan: {summary} ({time.time() - t0:.0f}s; {run.folder.file('plan.json')})")
    return plan, summary


def budget_outcome(folder: Path, target) -> str:
    """One line: the exported artifact against the budget it was fitted to."""
    from .export.inspect import artifact_report

    rep = artifact_report(folder)
    if target.kind == "size":
        got, limit = rep["size_on_disk_bytes"], target.value
    else:
        comps = [c for c in rep["components"] if c["component"] != "other"]
        got, limit = 8 * sum(c["bytes"] for c in comps) / sum(c["params"] for c in comps), target.value
    verdict = "within" if got <= limit else "OVER"
    return f"budget: artifact {target.describe(got)}, {verdict} the target {target.describe(limit)}"
