"""speedq-mlx command line: quantize, inspect, chat."""

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
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="Cap on dynamic tiles per image."),
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
):
    """Quantize a checkpoint into an MLX artifact that mlx-vlm loads."""
    from .pipeline import QuantizeArgs, quantize as run

    if output is None:
        output = Path("out") / f"{Path(model).name}-w{bits if bits else 'recipe'}-{method}"
    if resume:
        overwrite = True  # the artifact of an interrupted run is replaced when it completes
    run(QuantizeArgs(model=model, output=output, bits=bits, group_size=group_size, method=method,
                     recipe=recipe, dtype=dtype, compute_dtype=compute_dtype, overwrite=overwrite,
                     stages=stages, images=images, data=data, text=text, image_root=image_root,
                     max_samples=max_samples, max_tiles=max_tiles, seed=seed, run_dir=run_dir,
                     resume=resume))


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="Artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Show bits, group size, parameters, size and bits/weight per component."""
    from .report import artifact_report, format_report

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


def main(argv: list[str] | None = None) -> None:
    """Entry point: OpenBLAS on Linux, one-line errors, exit code 2 for bad input."""
    from .blas import reexec_with_openblas

    argv = list(sys.argv[1:] if argv is None else argv)
    reexec_with_openblas(argv)
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except SpeedQError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
