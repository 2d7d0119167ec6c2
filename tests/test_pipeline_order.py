"""The order in which `speedq-mlx quantize` quantizes a model (pipeline.py): stage 1 meets
a float model; stage 2 a quantized vision tower beside a float projector and language
model; stage 3 every planned module fake-quantized, embeddings and lm_head frozen; the
artifact every planned module quantized."""

import json

import mlx.core as mx
import pytest

from speedq_mlx import pipeline
from speedq_mlx.model.io import safetensors_header
from speedq_mlx.quant.layers import FakeQuant
from speedq_mlx.quant.plan import component_of

QA = [("What colour is it?", "Blue."), ("Describe the image.", "A small picture.")] * 4


def _state(model, plan) -> dict:
    """Per component: which of its planned modules are fake-quantized, and frozen."""
    modules = dict(model.named_modules())
    out = {}
    for path, setting in plan.items():
        if setting is None:
            continue
        m = modules[path]
        entry = out.setdefault(component_of(path), {"quantized": 0, "float": 0, "frozen": 0})
        entry["quantized" if isinstance(m, FakeQuant) else "float"] += 1
        if isinstance(m, FakeQuant) and not m.trainable_parameters():
            entry["frozen"] += 1
        if isinstance(m, FakeQuant) and component_of(path) == "language":
            entry.setdefault("latent", set()).add(str(m.weight.dtype))
    return out


@pytest.fixture
def observed(monkeypatch):
    seen = {}
    for name in ("run_stage1", "run_stage2", "run_stage3"):
        real = getattr(pipeline, name)

        def spy(run, model, *rest, _name=name, _real=real):
            plan = {"run_stage1": rest[0], "run_stage3": rest[1]}.get(_name, seen.get("plan"))
            seen["plan"] = plan
            seen[_name] = _state(model, plan)
            result = _real(run, model, *rest)
            seen[_name + "_after"] = _state(model, plan)
            return result

        monkeypatch.setattr(pipeline, name, spy)
    return seen


def test_pipeline_quantizes_in_order(tiny_ckpt, image_dir, tmp_path, observed):
    imgs = sorted(image_dir.iterdir())
    conv = tmp_path / "conv.jsonl"
    conv.write_text("\n".join(json.dumps({"image": str(imgs[i]), "conversations": [
        {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        for i, (q, a) in enumerate(QA)))
    out = tmp_path / "out"
    pipeline.quantize(pipeline.QuantizeArgs(
        model=str(tiny_ckpt), output=out, recipe=pipeline.registry.recipes_dir() / "quick.toml",
        images=image_dir, data=str(conv), max_tiles=2), log=lambda *a, **k: None)
    s1, s2, s3 = observed["run_stage1"], observed["run_stage2"], observed["run_stage3"]
    assert set(s1) == {"vision", "projector", "language", "embeddings", "lm_head"}
    assert all(v["quantized"] == 0 for v in s1.values())  # stage 1 starts from the float model
    assert s2["vision"]["float"] == 0  # stage 1's blocks and RTN for the rest of the tower
    assert all(s2[c]["quantized"] == 0 for c in ("projector", "language", "embeddings", "lm_head"))
    assert all(v["float"] == 0 for v in s3.values())  # stage 3: everything fake-quantized
    assert s3["language"]["latent"] == {str(mx.float32)}  # QAT's latent weights
    after = observed["run_stage3_after"]  # trained: the language linears; frozen: embeddings, lm_head
    assert after["embeddings"]["frozen"] == after["lm_head"]["frozen"] == 1
    assert after["language"]["frozen"] == 0 and after["vision"]["frozen"] == after["vision"]["quantized"]
    header = safetensors_header(out / "model.safetensors")
    quantized = {k.rsplit(".", 1)[0] for k in header if k.endswith(".scales")}
    assert quantized == {p for p, s in observed["plan"].items() if s is not None}
