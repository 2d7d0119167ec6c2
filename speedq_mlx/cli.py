"""speedq-mlx command line: quantize, inspect, chat, serve, eval, compare."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import SpeedQError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SPEED-Q low-bit quantization of InternVL vision-language models in MLX.")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.command()
def quantize(
    model: str = typer.Option(..., "--model", "-m",
                              help="Registered name (internvl2-1b, ...), Hugging Face repo id, or local folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Artifact folder to write (default: out/<model>-w<bits>-<method>)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b",
                                       help="Bits of the vision/projector/language linears (2, 3, 4, 5, 6, 8)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Group size (32, 64, 128)."),
    method: str = typer.Option("speedq", "--method", help="speedq (the SPEED-Q stages) or rtn (round-to-nearest)."),
    stages: str = typer.Option("1,2,3", "--stages", help="SPEED-Q stages to run, e.g. 1 or 1,2,3."),
    images: Optional[Path] = typer.Option(None, "--images",
                                          help="Folder of images: stage-1 calibration, and self-distillation data when --data is not given."),
    data: Optional[str] = typer.Option(None, "--data",
                                       help="Conversations JSON/JSONL (InternVL/LLaVA format) or hf:NAME[:split] (stages 2, 3)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Plain text for stage 3's clipping calibration."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that --data image paths are relative to."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use at most this many training records."),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles",
                                            help="Cap on dynamic tiles per training image (default: 6, "
                                                 "as InternVL's fine-tuning; + a thumbnail)."),
    max_length: int = typer.Option(2560, "--max-length",
                                   help="Tokens per training sample, image tokens included; longer "
                                        "conversations are cut after their images, or skipped."),
    held_out: float = typer.Option(0.05, "--held-out",
                                   help="Share of the training records held out; stages 2 and 3 end at their "
                                        "checkpoint with the lowest loss on them (0: no selection)."),
    seed: int = typer.Option(0, "--seed"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                           help="Checkpoints and reports (default: <output parent>/runs/<output name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoints."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe TOML (default: the model's own)."),
    dtype: str = typer.Option("float16", "--dtype",
                              help="dtype of scales and float weights in the artifact (float16, bfloat16, float32)."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype",
                                      help="dtype to compute in (float32 is fastest on a Linux CPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    target_size: Optional[str] = typer.Option(None, "--target-size",
                                              help="Fit the artifact folder in this size (315MB, 1.2GB; MB = 10^6 "
                                                   "bytes): per-module bits chosen by sensitivity on --text/--data."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw",
                                               help="Fit this many bits per weight over the quantizable modules "
                                                    "(as speedq-mlx inspect counts them), chosen by sensitivity."),
    plan: Optional[Path] = typer.Option(None, "--plan",
                                        help="Use a plan.json (from a --target-size run, or edited by hand)."),
    sensitivity_windows: int = typer.Option(8, "--sensitivity-windows",
                                            help="--target-*: calibration text windows of the sensitivity estimate."),
    sensitivity_tokens: int = typer.Option(256, "--sensitivity-tokens", help="--target-*: tokens per window."),
    sensitivity_images: int = typer.Option(8, "--sensitivity-images",
                                           help="--target-*: image samples (from --data or --images), one tile each."),
    run_eval: bool = typer.Option(False, "--eval",
                                  help="Evaluate the artifact against the source model at the end; "
                                       "the table goes into its README.md (see speedq-mlx eval)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="--eval: text file for perplexity/KL."),
    eval_vqa: Optional[Path] = typer.Option(None, "--eval-vqa", help="--eval: VQA JSONL for accuracy."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data",
                                             help="--eval: conversations file for answer-token KL."),
    eval_max_samples: Optional[int] = typer.Option(None, "--eval-max-samples",
                                                   help="--eval: first N VQA items / conversations."),
):
    """Quantize a checkpoint into an MLX artifact that mlx-vlm loads."""
    params = dict(locals())  # the options above, by name
    from .pipeline import quantize as run

    run(quantize_args(params))


def quantize_args(params: dict):
    """pipeline.QuantizeArgs from the quantize command's options (also for compare's runs)."""
    from .pipeline import QuantizeArgs

    p = dict(params)
    if p["output"] is None:
        p["output"] = Path("out") / f"{Path(p['model']).name}-w{p['bits'] or 'recipe'}-{p['method']}"
    if p["resume"]:
        p["overwrite"] = True  # the artifact of an interrupted run is replaced when it completes
    eval_opts = None
    if p.pop("run_eval") or p["eval_text"] or p["eval_vqa"] or p["eval_data"]:
        from .evaluation.evaluate import EvalOptions, load_inputs

        eval_opts = EvalOptions(text=p["eval_text"], vqa=p["eval_vqa"], data=p["eval_data"],
                                max_samples=p["eval_max_samples"], compute_dtype=p["compute_dtype"])
        load_inputs(eval_opts)  # bad eval inputs fail now, not after the quantization
    for key in ("eval_text", "eval_vqa", "eval_data", "eval_max_samples"):
        del p[key]
    return QuantizeArgs(val_fraction=p.pop("held_out"), eval=eval_opts, **p)


def parse_quantize_flags(argv: list[str]):
    """QuantizeArgs from `speedq-mlx quantize` flags, checked as the command checks them."""
    command = typer.main.get_command(app).commands["quantize"]
    try:
        ctx = command.make_context("quantize", list(argv))
    except Exception as e:  # usage errors (typer's own click exceptions): one line
        if not hasattr(e, "format_message"):
            raise
        raise SpeedQError(f"quantize {' '.join(argv)}: {e.format_message()}") from None
    return quantize_args(ctx.params)


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="Artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Show bits, group size, parameters, size and bits/weight per component."""
    from .export.inspect import artifact_report, format_report

    rep = artifact_report(folder)
    typer.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))


@app.command()
def chat(
    folder: Path = typer.Argument(..., help="Artifact folder."),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="Image to talk about."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Ask once and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="Replace the default system prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
):
    """Chat with an artifact in the model's own chat template (streaming, multi-turn)."""
    from .chat import chat_loop

    chat_loop(folder, image, prompt, system, max_tokens, temperature,
              write=lambda *a, **k: typer.echo(*a, nl=k.get("end", "\n") == "\n"))


@app.command()
def serve(
    folder: Path = typer.Argument(..., help="Artifact folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", "-p"),
    name: Optional[str] = typer.Option(None, "--name", help="Model id clients ask for (default: the folder name)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="New tokens when a request sets no max_tokens."),
    max_images: int = typer.Option(6, "--max-images", help="Images per request, at most."),
    local_images: Optional[bool] = typer.Option(None, "--local-images/--no-local-images",
                                                help="Accept local file paths as image_url (default: "
                                                     "only when listening on a loopback address)."),
):
    """An OpenAI-compatible chat server (/v1/chat/completions, /v1/models, /health) that
    prompts the model in its own chat template."""
    from .serve.app import check_port, serve as run_server
    from .serve.engine import Engine

    if not 1 <= port <= 65535:
        raise SpeedQError(f"--port must be in 1..65535, got {port}")
    if max_tokens < 1 or max_images < 0:
        raise SpeedQError("--max-tokens must be at least 1 and --max-images at least 0")
    check_port(host, port)  # before the model loads
    if local_images is None:
        local_images = host in ("127.0.0.1", "localhost", "::1")
    typer.echo(f"loading {folder}", err=True)
    engine = Engine(folder, name, allow_local_images=local_images, max_images=max_images,
                    max_tokens=max_tokens)
    run_server(engine, host, port, log=lambda m: typer.echo(m, err=True))


# Options shared by eval and compare.
_TEXT = typer.Option(None, "--text", help="Text file (or folder of .txt / JSONL with 'text'): perplexity, KL, top-1 agreement.")
_VQA = typer.Option(None, "--vqa", help="VQA JSON/JSONL of {image, question, answer|answers}: accuracy.")
_DATA = typer.Option(None, "--data", help="Conversations JSON/JSONL (InternVL/LLaVA format): KL on answer tokens.")
_IMAGE_ROOT = typer.Option(None, "--image-root", help="Folder that --vqa / --data image paths are relative to.")
_MAX_SAMPLES = typer.Option(None, "--max-samples", help="Use the first N VQA items and conversations.")
_TEXT_TOKENS = typer.Option(512, "--text-tokens", help="Tokens per text window.")
_TEXT_WINDOWS = typer.Option(16, "--text-windows", help="Number of text windows.")
_BATCH = typer.Option(1, "--batch-size", help="Windows / conversations per forward pass.")
_MAX_TOKENS = typer.Option(32, "--max-tokens", help="New tokens per VQA answer (greedy).")
_SPEED_TOKENS = typer.Option(32, "--speed-tokens", help="New tokens of the timed generation.")
_MAX_TILES = typer.Option(None, "--max-tiles", help="Cap on dynamic tiles per image.")
_COMPUTE = typer.Option("float32", "--compute-dtype",
                        help="dtype to compute in (float32 is fastest on a Linux CPU; float16 as on a Mac).")


def _eval_options(text, vqa, data, image_root, max_samples, text_tokens, text_windows, batch_size,
                  max_tokens, speed_tokens, max_tiles, compute_dtype):
    from .evaluation.evaluate import EvalOptions

    return EvalOptions(text=text, vqa=vqa, data=data, image_root=image_root, max_samples=max_samples,
                       text_tokens=text_tokens, text_windows=text_windows, batch_size=batch_size,
                       max_tokens=max_tokens, speed_tokens=speed_tokens, max_tiles=max_tiles,
                       compute_dtype=compute_dtype)


def _bundled_vqa(reference: str, text, vqa, data):
    """With no inputs given, a bundled model's own VQA test file (tiny-shapes)."""
    from .model.registry import bundled_data

    bundle = bundled_data(reference)
    if bundle and text is None and vqa is None and data is None:
        typer.echo(f"VQA: the test file bundled with {reference} ({bundle['vqa']})", err=True)
        return bundle["vqa"]
    return vqa


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model to evaluate: artifact folder, HF folder or registered name."),
    reference: str = typer.Option(..., "--reference", "-r", help="Reference (usually the full-precision source)."),
    text: Optional[Path] = _TEXT, vqa: Optional[Path] = _VQA, data: Optional[Path] = _DATA,
    image_root: Optional[Path] = _IMAGE_ROOT, max_samples: Optional[int] = _MAX_SAMPLES,
    text_tokens: int = _TEXT_TOKENS, text_windows: int = _TEXT_WINDOWS, batch_size: int = _BATCH,
    max_tokens: int = _MAX_TOKENS, speed_tokens: int = _SPEED_TOKENS, max_tiles: Optional[int] = _MAX_TILES,
    compute_dtype: str = _COMPUTE,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full results (per-item VQA too) here."),
):
    """Measure MODEL against REF: size, bits/weight, memory, speed, VQA accuracy, perplexity, KL, agreement."""
    from .evaluation.evaluate import evaluate, format_table, write_json

    vqa = _bundled_vqa(reference, text, vqa, data)
    opts = _eval_options(text, vqa, data, image_root, max_samples, text_tokens, text_windows, batch_size,
                         max_tokens, speed_tokens, max_tiles, compute_dtype)
    _note_slow_blas()
    result = evaluate(model, reference, opts, log=lambda m: typer.echo(m, err=True))
    typer.echo(format_table(result))
    if json_out:
        write_json(result, json_out)


@app.command()
def compare(
    model: str = typer.Option(..., "--model", "-m", help="Source model (also the reference)."),
    run: Optional[list[str]] = typer.Option(None, "--run",
                                            help="NAME=FLAGS, repeatable: quantize flags (\"w2=--method rtn --bits 2\") "
                                                 "or mlx-vlm convert flags (\"awq4=mlx-vlm:--q-bits 4 --quant-method awq\"). "
                                                 "Default: RTN at 2 and 4 bits."),
    out: Path = typer.Option(Path("out/compare"), "--out", "-o", help="Folder for artifacts, compare.md/.json/.png."),
    reuse: bool = typer.Option(False, "--reuse", help="Evaluate existing OUT/NAME folders instead of quantizing again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Quantize again over existing OUT/NAME folders."),
    text: Optional[Path] = _TEXT, vqa: Optional[Path] = _VQA, data: Optional[Path] = _DATA,
    image_root: Optional[Path] = _IMAGE_ROOT, max_samples: Optional[int] = _MAX_SAMPLES,
    text_tokens: int = _TEXT_TOKENS, text_windows: int = _TEXT_WINDOWS, batch_size: int = _BATCH,
    max_tokens: int = _MAX_TOKENS, speed_tokens: int = _SPEED_TOKENS, max_tiles: Optional[int] = _MAX_TILES,
    compute_dtype: str = _COMPUTE,
):
    """Quantize one model several ways, evaluate each, write a markdown table and a quality-vs-size plot."""
    from .evaluation.compare import compare as run_compare, markdown, parse_runs

    vqa = _bundled_vqa(model, text, vqa, data)
    opts = _eval_options(text, vqa, data, image_root, max_samples, text_tokens, text_windows, batch_size,
                         max_tokens, speed_tokens, max_tiles, compute_dtype)
    _note_slow_blas()
    summary = run_compare(model, parse_runs(run or []), out, opts, parse_quantize_flags, reuse=reuse,
                          overwrite=overwrite, log=lambda m: typer.echo(m, err=True))
    typer.echo(markdown(summary))
    typer.echo(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


def _note_slow_blas() -> None:
    """One line on stderr when the work ahead would run on MLX's slow reference BLAS."""
    from .blas import slow_blas_note

    note = slow_blas_note()
    if note:
        typer.echo(note, err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit code 2 for bad input (the fast BLAS is loaded by
    importing speedq_mlx, see blas.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False, prog_name="speedq-mlx")
    except SpeedQError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # usage errors (typer vendors its own click: match by shape)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
