"""speedq-mlx eval: a model measured against a reference, side by side.

MODEL and REF are folders mlx-vlm loads (an exported artifact, or a full-precision
Hugging Face InternVL checkpoint / registered name). Measured:
- size on disk, bits per weight overall and per component (export/inspect.py);
- peak MLX memory and tokens/s while each model generates (generate.py);
- VQA accuracy (vqa.py) on --vqa;
- text fidelity on --text: perplexity of both, KL(REF || MODEL) and top-1 agreement;
- image-text fidelity on --data: the same on the answer tokens of conversations.
Inputs are all read and checked before any model is loaded; the two tokenizers must
be the same, since KL and agreement compare distributions over the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from ..data.encode import collate, encoder, iter_samples
from ..data.records import load_conversations
from ..data.text import load_text, token_windows
from ..errors import SpeedQError
from ..model import internvl
from ..model import io as model_io
from . import fidelity, vqa
from .cpu_compute import use_fast_cpu_matmuls
from . import generate

SPEED_PROMPT = "Describe the image in detail."
SPEED_TEXT_PROMPT = "Write a long story about a town by a river."


@dataclass
class EvalOptions:
    text: Path | None = None
    vqa: Path | None = None
    data: Path | None = None
    image_root: Path | None = None  # what --vqa / --data image paths are relative to
    max_samples: int | None = None  # VQA items and --data records used (first N)
    text_tokens: int = 512  # tokens per text window
    text_windows: int = 16
    batch_size: int = 1
    max_tokens: int = 32  # new tokens per VQA answer
    speed_tokens: int = 32  # new tokens of the timed generation
    max_tiles: int | None = None
    max_length: int | None = 2048
    compute_dtype: str = "float32"
    seed: int = 0


@dataclass
class Inputs:
    texts: list | None
    items: list | None
    records: list | None


def load_inputs(opts: EvalOptions) -> Inputs:
    """Read and check every eval input (files, images, numbers) before a model is loaded."""
    for name in ("text_tokens", "text_windows", "batch_size", "max_tokens", "speed_tokens"):
        if getattr(opts, name) < 1 or (name == "text_tokens" and opts.text_tokens < 2):
            raise SpeedQError(f"--{name.replace('_', '-')} must be at least {2 if name == 'text_tokens' else 1}")
    if opts.max_samples is not None and opts.max_samples < 1:
        raise SpeedQError("--max-samples must be at least 1")
    model_io.parse_dtype(opts.compute_dtype)
    texts = load_text(opts.text) if opts.text else None
    items = vqa.load_items(opts.vqa, opts.image_root, opts.max_samples) if opts.vqa else None
    records = None
    if opts.data:
        records = load_conversations(opts.data, opts.image_root)[:opts.max_samples]
    return Inputs(texts, items, records)


# ---------------------------------------------------------------- models


@dataclass
class Side:
    """One model to evaluate: where it is, how to tokenize for it, and (once loaded) it."""

    path: Path
    config: dict
    tokenizer: object
    artifact: bool
    model: object = None


def open_side(spec: str) -> Side:
    """Config and tokenizer of a model folder / name (weights are loaded later)."""
    path, _ = model_io.resolve_source(str(spec))
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpeedQError(f"{path} has no config.json (not a model folder)")
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") != "internvl_chat":
        raise SpeedQError(f"{path}: model_type is {config.get('model_type')!r}; eval supports "
                          "InternVL models (internvl_chat)")
    artifact = "quantization" in config or model_io.is_mlx_folder(path)
    if not artifact:
        model_io.read_config(path)  # the checks quantize applies to a source checkpoint
    return Side(path, config, model_io.load_tokenizer(path), artifact)


def load_weights(side: Side, dtype) -> None:
    """Load one side's model with the tokenizer's <IMG_CONTEXT> id (mlx-vlm's default is
    wrong for InternVL2), computing in `dtype` (quantized layers keep their codes; on a CPU
    they take the float-matmul path for many-row inputs, see cpu_compute.py)."""
    side.model = model_io.load_model(side.path, dtype, internvl.image_token_id(side.tokenizer),
                                     artifact=side.artifact)
    use_fast_cpu_matmuls(side.model)


def check_compatible(model: Side, ref: Side) -> None:
    """Refuse a reference whose tokens mean something else: KL and agreement compare
    next-token distributions position by position."""
    vm, vr = model.tokenizer.get_vocab(), ref.tokenizer.get_vocab()
    if vm != vr:
        diff = sorted(set(vm.items()) ^ set(vr.items()), key=lambda kv: kv[1])[:1]
        hint = f"; e.g. token {diff[0][0]!r}" if diff else ""
        raise SpeedQError(f"{model.path} and reference {ref.path} have different tokenizers "
                          f"({len(vm)} vs {len(vr)} tokens{hint}); compare a model with its own source")
    sizes = [internvl.llm_config(s.config).get("vocab_size") for s in (model, ref)]
    if sizes[0] != sizes[1]:
        raise SpeedQError(f"{model.path} and reference {ref.path} have different vocabulary "
                          f"sizes ({sizes[0]} vs {sizes[1]})")


# ---------------------------------------------------------------- measurements


def _speed_probe(side: Side, enc, inputs: Inputs, n_tokens: int, eos) -> generate.Generation:
    """A fixed number of new tokens (end-of-turn ignored) after an image prompt when the
    inputs have an image, else a text prompt."""
    with_image = [x.images[:1] for x in (inputs.items or []) + (inputs.records or []) if x.images]
    image = with_image[0] if with_image else []
    ids, pv = generate.prompt(enc, SPEED_PROMPT if image else SPEED_TEXT_PROMPT, image)
    return generate.generate(side.model, enc, ids, pv, eos, n_tokens, ignore_eos=True)


def generation_side(side: Side, inputs: Inputs, opts: EvalOptions, dtype, log) -> dict:
    """Load one model and measure what needs it alone: VQA, speed, peak memory, size."""
    from ..export.inspect import artifact_report

    mx.clear_cache()
    base = mx.get_active_memory()  # the other model, when it is loaded already
    log(f"loading {side.path}")
    load_weights(side, dtype)
    mx.reset_peak_memory()
    enc = encoder(side.config, side.tokenizer, opts.max_tiles)
    eos = internvl.eos_token_ids(side.tokenizer)
    out: dict = {"path": str(side.path), "kind": "artifact" if side.artifact else "checkpoint"}
    if inputs.items:
        log(f"VQA: {len(inputs.items)} items, greedy, up to {opts.max_tokens} new tokens")

        def predict(item):
            ids, pv = generate.prompt(enc, item.question, item.images)
            return generate.generate(side.model, enc, ids, pv, eos, opts.max_tokens).text

        out["vqa"] = vqa.accuracy(inputs.items, predict)
    out["speed"] = generate.speed([_speed_probe(side, enc, inputs, opts.speed_tokens, eos)])
    out["peak_memory_bytes"] = int(mx.get_peak_memory() - base)  # its weights, KV cache, activations
    rep = artifact_report(side.path)
    out["size"] = {k: rep[k] for k in ("size_on_disk_bytes", "weight_bytes", "params", "bits_per_weight", "dtype")}
    out["components"] = {r["component"]: {"settings": r["settings"], "bits_per_weight": r["bits_per_weight"],
                                          "bytes": r["bytes"], "params": r["params"]}
                         for r in rep["components"]}
    return out


def evaluate(model: str, reference: str, opts: EvalOptions, log=print,
             reference_side: dict | None = None) -> dict:
    """Every measurement of MODEL against REF as a JSON-ready dict.

    `reference_side` (the "reference" part of an earlier result with the same REF and
    inputs) skips the reference's own generation, size and memory measurements.
    """
    inputs = load_inputs(opts)
    dtype = model_io.parse_dtype(opts.compute_dtype)
    m, r = open_side(model), open_side(reference)
    check_compatible(m, r)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}}
    result["model"] = generation_side(m, inputs, opts, dtype, log)  # measured alone: memory is its own
    if reference_side is None:
        result["reference"] = generation_side(r, inputs, opts, dtype, log)
    else:
        log(f"loading {r.path}")
        load_weights(r, dtype)
        result["reference"] = reference_side
    if inputs.texts is not None:
        windows = token_windows(inputs.texts, r.tokenizer, opts.text_tokens, opts.text_windows,
                                     seed=opts.seed)
        log(f"text fidelity: {windows.shape[0]} windows of {windows.shape[1]} tokens")
        result["text"] = {"windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1]),
                          **fidelity.text_fidelity(m.model, r.model, windows, opts.batch_size)}
    if inputs.records is not None:
        enc = encoder(r.config, r.tokenizer, opts.max_tiles)
        samples = list(iter_samples(inputs.records, enc, opts.max_length))
        if not samples:
            raise SpeedQError(f"{opts.data}: no usable samples (every one longer than max_length)")
        pad = internvl.pad_token_id(r.tokenizer)
        log(f"image-text fidelity: {len(samples)} conversations")
        batches = (collate(samples[i:i + opts.batch_size], pad)
                   for i in range(0, len(samples), opts.batch_size))
        result["data"] = {"samples": len(samples),
                          **fidelity.data_fidelity(m.model, r.model, batches, enc.image_token_id)}
    return result


# ---------------------------------------------------------------- presentation


def _mb(n):
    return None if n is None else n / 1e6


def rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, model, reference) rows shared by the terminal table and the model card."""
    m, r = result["model"], result["reference"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = [("size on disk (MB)", f(_mb(m["size"]["size_on_disk_bytes"]), ".2f"),
            f(_mb(r["size"]["size_on_disk_bytes"]), ".2f")),
           ("bits per weight", f(m["size"]["bits_per_weight"], ".3f"), f(r["size"]["bits_per_weight"], ".3f"))]
    for comp in dict.fromkeys([*m["components"], *r["components"]]):
        cm, cr = m["components"].get(comp, {}), r["components"].get(comp, {})
        out.append((f"  {comp} bits/weight", f(cm.get("bits_per_weight"), ".3f"),
                    f(cr.get("bits_per_weight"), ".3f")))
    out += [("peak memory (MB)", f(_mb(m.get("peak_memory_bytes")), ".1f"), f(_mb(r.get("peak_memory_bytes")), ".1f")),
            ("prompt tokens/s", f(m["speed"]["prompt_tokens_per_s"], ".1f"), f(r["speed"]["prompt_tokens_per_s"], ".1f")),
            ("generation tokens/s", f(m["speed"]["generation_tokens_per_s"], ".1f"),
             f(r["speed"]["generation_tokens_per_s"], ".1f"))]
    if "vqa" in m:
        out.append((f"VQA accuracy ({m['vqa']['items']} items)", f(m["vqa"]["accuracy"], ".4f"),
                    f(r.get("vqa", {}).get("accuracy"), ".4f")))
    for key, label in (("text", "text"), ("data", "answer")):
        t = result.get(key)
        if not t:
            continue
        out += [(f"{label} perplexity ({t['tokens']} tokens)", f(t["ppl_model"], ".4f"), f(t["ppl_ref"], ".4f")),
                (f"{label} KL(ref||model) nats/token", f(t["kl"], ".5f"), "0"),
                (f"{label} top-1 agreement", f(t["top1_agreement"], ".4f"), "1")]
    return out


def format_table(result: dict) -> str:
    """Plain-text table for the terminal."""
    body = rows(result)
    w = max(len(r[0]) for r in body)
    lines = [f"{'':<{w}}  {'model':>12}  {'reference':>12}"]
    lines += [f"{a:<{w}}  {b:>12}  {c:>12}" for a, b, c in body]
    lines.append(f"model:     {result['model']['path']}")
    lines.append(f"reference: {result['reference']['path']}")
    return "\n".join(lines)


def describe(result: dict) -> str:
    """One sentence on what was measured and how (for the model card)."""
    s = result["settings"]
    parts = []
    if "text" in result:
        t = result["text"]
        parts.append(f"text `{Path(s['text']).name}` ({t['windows']} windows of {t['window_tokens']} tokens)")
    if "vqa" in result["model"]:
        parts.append(f"VQA `{Path(s['vqa']).name}` ({result['model']['vqa']['items']} items, greedy, "
                     f"up to {s['max_tokens']} new tokens)")
    if "data" in result:
        parts.append(f"conversations `{Path(s['data']).name}` ({result['data']['samples']} samples, answer tokens)")
    what = "; ".join(parts) or "size and speed only"
    return (f"Measured with `speedq-mlx eval` against the reference on {what}. Computed in "
            f"{s['compute_dtype']} on {_machine()}; speed: {s['speed_tokens']} greedy tokens after one prompt.")


def _machine() -> str:
    import platform

    device = "GPU" if mx.default_device().type == mx.DeviceType.gpu else "CPU"
    return f"{platform.system()} {platform.machine()}, MLX {mx.__version__} on the {device}"


def markdown_table(result: dict) -> str:
    """The same rows as a markdown table (model card, compare)."""
    lines = ["| metric | this model | reference |", "|---|---:|---:|"]
    lines += [f"| {a.strip().replace('|', chr(92) + '|')} | {b} | {c} |" for a, b, c in rows(result)]
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------- quantize --eval


def eval_export(output: Path, source: Path, opts: EvalOptions, card_info: dict, run_dir: Path,
                log=print) -> dict:
    """After an export: evaluate the artifact against its source, keep the JSON in the run
    folder and rewrite the artifact's model card with the eval table."""
    from ..export.card import write_card

    result = evaluate(str(output), str(source), opts, log)
    write_json(result, Path(run_dir) / "eval.json")
    log(format_table(result))
    card = write_card(output, card_info, eval_table=markdown_table(result), eval_notes=describe(result))
    log(f"eval results: {Path(run_dir) / 'eval.json'}; model card: {card}")
    return result
