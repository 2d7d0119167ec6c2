"""The MLX quantizers speedq-mlx is measured against, run offline on InternVL checkpoints.

mlx-vlm 0.7.10's `convert` (RTN, AWQ) works on the InternVL checkpoint itself; mlx-lm 0.32.2's
GPTQ, AWQ and DWQ work on text models, so the language model is extracted into an mlx-lm
Qwen2 folder, quantized there and spliced back into an InternVL artifact that mlx_vlm.load
loads. Each tool runs through its Python API where its command line cannot say what the
comparison needs: our calibration text (mlx-lm's CLIs read a fixed file in ~/.cache/mlx-lm,
and fetch it when absent), embeddings and lm_head at 4-bit g32 like speedq-mlx's recipes,
the projector left in float, float32 compute (dwq's CLI forces bf16, 8-40x slower on this
CPU). On the CPU, MLX's quantized matmul is ~50x slower than a float matmul for many-row
inputs, so the quantized layers these tools train or score take the float path
(speedq_mlx.evaluation.cpu_compute): the same function, far faster.

    python -m devkit.peers vlm   SRC OUT --bits 2 [--method rtn|awq] [--calib FILE]
    python -m devkit.peers gptq  SRC OUT --bits 2 --calib FILE
    python -m devkit.peers awq   SRC OUT --bits 2 --calib FILE
    python -m devkit.peers dwq   SRC OUT --student AWQ_OUT --calib FILE
(SRC: an InternVL checkpoint; OUT: the InternVL artifact written.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from speedq_mlx.evaluation import cpu_compute

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")
PREFIX = "language_model."
EMBED_KEYS = ("embed_tokens", "lm_head")


def _weights(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def extract_language_model(src: Path, out: Path) -> Path:
    """The Qwen2 language model of an InternVL checkpoint as a plain mlx-lm folder."""
    cfg = json.loads((src / "config.json").read_text())
    llm = dict(cfg["llm_config"])
    llm.setdefault("architectures", ["Qwen2ForCausalLM"])
    llm["tie_word_embeddings"] = bool(llm.get("tie_word_embeddings", False))  # mlx-lm defaults it True
    weights = {k[len(PREFIX):]: v for k, v in _weights(src).items() if k.startswith(PREFIX)}
    if llm["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(llm, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def splice_into_internvl(src: Path, lm: Path, out: Path) -> Path:
    """An InternVL artifact: vision tower and projector of `src` as they are, the quantized
    language model of the mlx-lm folder `lm` under language_model., and its quantization
    entries keyed by full module path (mlx-lm's global "bits" is not always meaningful:
    mlx_lm.awq writes a dummy 4)."""
    cfg = json.loads((src / "config.json").read_text())
    q = json.loads((lm / "config.json").read_text())["quantization"]
    weights = {k: v for k, v in _weights(src).items() if not k.startswith(PREFIX)}
    weights.update({PREFIX + k: v for k, v in _weights(lm).items()})
    block = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
    for k, v in q.items():
        if isinstance(v, dict):
            block[PREFIX + k] = {"mode": "affine", **v}
        elif v is False:
            block[PREFIX + k] = False
    cfg.pop("auto_map", None)
    cfg["quantization"] = cfg["quantization_config"] = block
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    for name in TOKENIZER_FILES + ("processor_config.json", "preprocessor_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def calibration_tokens(tokenizer, text: Path, num_samples: int, sequence_length: int) -> mx.array:
    """What mlx_lm.quant.utils.load_data does with its own file, on ours: the whole text
    tokenized, cut into rows, a seeded permutation, the first num_samples."""
    tokens = mx.array(tokenizer.encode(Path(text).read_text()))
    tokens = tokens[: (tokens.size // sequence_length) * sequence_length].reshape(-1, sequence_length)
    return tokens[mx.random.permutation(tokens.shape[0])[:num_samples]]


def install_fast_cpu_matmuls() -> None:
    """Every nn.QuantizedLinear / QuantizedEmbedding the tools build takes the float path."""
    nn.QuantizedLinear.__call__ = cpu_compute.FastCPUQuantizedLinear.__call__
    nn.QuantizedEmbedding.as_linear = cpu_compute.FastCPUQuantizedEmbedding.as_linear


def vlm_predicate(embed_bits: int, embed_group_size: int):
    """mlx_vlm.convert's quant_predicate: vision tower and mlp1 in float, embed_tokens and
    lm_head at embed_bits / embed_group_size, every other linear at the global setting."""
    from mlx_vlm.utils import skip_multimodal_module

    def predicate(path, module):
        if skip_multimodal_module(path) or path.startswith("mlp1"):
            return False
        if any(k in path for k in EMBED_KEYS):
            return {"group_size": embed_group_size, "bits": embed_bits, "mode": "affine"}
        return True

    return predicate


def run_vlm(a) -> None:
    import mlx_vlm.quant as vq
    from mlx_vlm.convert import convert

    if a.calib and a.method == "awq":  # its text calibration reads this list at call time
        text = Path(a.calib).read_text()
        vq.DEFAULT_CALIBRATION_TEXT[:] = [text[i * 2000:(i + 1) * 2000] for i in range(a.num_samples)]
    convert(str(a.src), mlx_path=str(a.out), quantize=True, q_bits=a.bits, q_group_size=a.group_size,
            quant_method=a.method, dtype="float32", quant_predicate=vlm_predicate(a.embed_bits, a.embed_group_size))


def _lm_run(a, quantize) -> None:
    """Extract, quantize with `quantize(model, tokenizer, config) -> config`, splice back."""
    from mlx_lm.utils import load, save

    with tempfile.TemporaryDirectory(dir=a.out.parent) as tmp:
        lm_src = extract_language_model(a.src, Path(tmp) / "lm")
        model, tok, config = load(str(lm_src), lazy=True, return_config=True)
        config = quantize(model, tok, config, lm_src)
        save(str(Path(tmp) / "q"), str(lm_src), model, tok, config)
        splice_into_internvl(a.src, Path(tmp) / "q", a.out)


def run_gptq(a) -> None:
    """mlx_lm.gptq; an untied lm_head is rounded to nearest at embed bits first (GPTQ would
    take it to --bits; mlx-lm offers no option), the embedding gets the fallback setting."""
    from mlx_lm.quant.gptq import gptq_quantize

    def quantize(model, tok, config, _):
        data = calibration_tokens(tok, a.calib, a.num_samples, a.sequence_length)
        head = "lm_head" in model
        if head:
            model.lm_head = model.lm_head.to_quantized(group_size=a.embed_group_size, bits=a.embed_bits)
        model, q = gptq_quantize(model, data, a.bits, a.group_size, a.embed_bits, a.embed_group_size)
        if head:
            q["lm_head"] = {"bits": a.embed_bits, "group_size": a.embed_group_size}
        return {**config, "quantization": q}

    _lm_run(a, quantize)


def run_awq(a) -> None:
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    def quantize(model, tok, config, _):
        data = calibration_tokens(tok, a.calib, a.num_samples, a.sequence_length)
        awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], bits=a.bits,
                     group_size=a.group_size, embed_bits=a.embed_bits,
                     embed_group_size=a.embed_group_size, n_grid=a.n_grid)
        return update_config(model, config)

    _lm_run(a, quantize)


def run_dwq(a) -> None:
    """mlx_lm.dwq in float32 from an already quantized student (an AWQ artifact): its scales,
    biases and norms trained against the float model's distribution on the calibration text."""
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.quant.dwq import dwq_quantize, load_data
    from mlx_lm.utils import load, save

    from .texts import jsonl_folder

    np.random.seed(a.seed)
    with tempfile.TemporaryDirectory(dir=a.out.parent) as tmp:
        teacher_dir = extract_language_model(a.src, Path(tmp) / "teacher")
        student_dir = extract_language_model(a.student, Path(tmp) / "student")
        student_cfg = json.loads((a.student / "config.json").read_text())["quantization"]
        cfg = json.loads((student_dir / "config.json").read_text())
        cfg["quantization"] = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in student_cfg.items()}
        (student_dir / "config.json").write_text(json.dumps(cfg))
        teacher, tok = load(str(teacher_dir), lazy=True)
        student, tok, config = load(str(student_dir), lazy=True, return_config=True)
        data = jsonl_folder(a.calib, Path(tmp) / "data")
        train, valid = load_data(tok, str(data), a.num_samples, a.sequence_length, num_valid_samples=a.num_valid)
        opt = optim.Adam(learning_rate=a.learning_rate, bias_correction=True)
        dwq_quantize(student, lambda batch, i, split: teacher(batch), opt, train, valid,
                     batch_size=a.batch_size, max_seq_length=a.sequence_length, seed=a.seed, dtype=mx.float32)
        save(str(Path(tmp) / "q"), str(student_dir), student, tok, config)
        splice_into_internvl(a.src, Path(tmp) / "q", a.out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tool", choices=["vlm", "gptq", "awq", "dwq"])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--embed-group-size", type=int, default=32)
    ap.add_argument("--method", default="rtn", choices=["rtn", "awq"])
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--sequence-length", type=int, default=256)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--student", type=Path)
    ap.add_argument("--num-valid", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    mx.random.seed(a.seed)
    install_fast_cpu_matmuls()
    t0 = time.time()
    {"vlm": run_vlm, "gptq": run_gptq, "awq": run_awq, "dwq": run_dwq}[a.tool](a)
    print(json.dumps({"tool": a.tool, "out": str(a.out), "seconds": round(time.time() - t0, 1),
                      "peak_mlx_memory_gb": round(mx.get_peak_memory() / 1e9, 2)}))


if __name__ == "__main__":
    main()
