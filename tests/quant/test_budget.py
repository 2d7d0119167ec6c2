"""Size budgets (quant/budget.py, quant/sensitivity.py, `quantize --target-size/--target-bpw/--plan`):
the knapsack against brute force, the Fisher damage against measured KL, the size accounting
against exported bytes, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import shutil
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from speedq_mlx.errors import SpeedQError
from speedq_mlx.export.artifact import support_files_bytes, write_artifact
from speedq_mlx.export.inspect import artifact_report
from speedq_mlx.model import io as model_io
from speedq_mlx.model.internvl import image_token_id
from speedq_mlx.quant import budget as B
from speedq_mlx.quant.layers import fake_quant_module
from speedq_mlx.quant.plan import apply_plan, quantizable_modules, read_plan_file

from devkit.testing import ENGLISH_TEXT, run_cli


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join([ENGLISH_TEXT] * 12))
    return path


def _refused(code, err, match):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


# ---------------------------------------------------------------- knapsack


def _instance(rng, modules=5, k=5):
    opts = {}
    for m in range(modules):
        n = int(rng.integers(1000, 20000))
        bits = np.sort(rng.uniform(2, 16, k))
        dmg = rng.uniform(0.1, 10) * np.exp(-rng.uniform(0.5, 1.0) * bits) * rng.uniform(0.7, 1.3, k)
        opts[f"m{m}"] = [(i, int(n * b / 8), float(d)) for i, (b, d) in enumerate(zip(bits, dmg))]
    return opts


def _brute(opts, limit):
    """Least damage of any plan within `limit` bytes (inf when none fits)."""
    return min((sum(o[2] for o in c) for c in itertools.product(*opts.values())
                if sum(o[1] for o in c) <= limit), default=float("inf"))


def test_knapsack_against_brute_force():
    """Every solution fits; none is worse than the best plan within budget - modules * unit
    (the rounding bound of the dynamic programme); almost all are exactly optimal."""
    rng = np.random.default_rng(0)
    exact = 0
    for _ in range(150):
        opts = _instance(rng)
        lo = sum(min(o[1] for o in v) for v in opts.values())
        hi = sum(max(o[1] for o in v) for v in opts.values())
        budget = int(rng.uniform(lo, hi))
        choice, lam = B.solve(opts, budget)
        got = B.total(opts, choice, 2)
        assert B.total(opts, choice, 1) <= budget and lam >= 0
        unit = -(-budget // (200 * len(opts)))
        assert got <= _brute(opts, budget - len(opts) * unit) + 1e-12
        exact += got <= _brute(opts, budget) * (1 + 1e-9)
    assert exact >= 0.9 * 150, exact


def test_lagrangian_plan_is_optimal_for_its_own_size():
    rng = np.random.default_rng(1)
    for _ in range(40):
        opts = _instance(rng)
        choice = B.lagrangian(opts, 10.0 ** rng.uniform(-6, -2))
        size = B.total(opts, choice, 1)
        assert B.total(opts, choice, 2) == pytest.approx(_brute(opts, size), rel=1e-12)


@pytest.mark.parametrize("text, expected", [
    ("315MB", 315_000_000), ("315 mb", 315_000_000), ("1.5GB", 1_500_000_000), ("800kB", 800_000),
    ("300MiB", 300 * 2**20), ("123456", 123456), ("2e6", 2_000_000)])
def test_parse_size(text, expected):
    assert B.parse_size(text) == expected


@pytest.mark.parametrize("text", ["315XB", "MB", "-3MB", "0", "abc"])
def test_parse_size_refuses(text):
    with pytest.raises(SpeedQError, match="expected a size like 315MB"):
        B.parse_size(text)


# ---------------------------------------------------------------- sensitivity


def test_fisher_damage_predicts_the_measured_kl():
    """On the trained tiny-shapes model, the diagonal-Fisher damage of quantizing one module
    (RTN at 2, 3, 4 bits) against the KL(fp || quantized) measured on the same windows."""
    from speedq_mlx.data.records import load_conversations
    from speedq_mlx.data.text import record_texts, token_windows
    from speedq_mlx.model import internvl, registry
    from speedq_mlx.model.forward import logits
    from speedq_mlx.quant.sensitivity import damages, fisher_diagonal

    src = registry.local_model("tiny-shapes")
    tok, cfg = model_io.load_tokenizer(src), model_io.read_config(src)
    model = model_io.load_model(src, mx.float32, image_token_id(tok))
    records = load_conversations(registry.bundled_data("tiny-shapes")["data"])
    windows = token_windows(record_texts(records, internvl.template(cfg)), tok, 128, 8, 0)
    batches = [{"input_ids": w[None], "pixel_values": None, "start": 0} for w in windows]
    mods = quantizable_modules(model)
    paths = [p for p in mods if p.startswith(tuple(f"language_model.model.layers.{i}." for i in (0, 2, 4)))]
    paths += ["language_model.model.embed_tokens", "language_model.lm_head"]
    fisher, n = fisher_diagonal(model, batches, paths, model.config.image_token_index)
    assert n == 8 * 128
    settings = [(2, 64), (3, 64), (4, 64)]
    est = damages(model, fisher, {p: settings for p in paths}, mx.float16)

    def logprobs():
        lg = logits(model, windows).astype(mx.float32)
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    ref = logprobs()
    pairs = []
    for p in paths:
        for s in settings:
            model.update_modules(tree_unflatten([(p, fake_quant_module(mods[p], *s, scale_dtype=mx.float16))]))
            kl = float((mx.exp(ref) * (ref - logprobs())).sum(-1).mean())
            model.update_modules(tree_unflatten([(p, mods[p])]))
            pairs.append((est[p][s], kl))
    e, a = np.array(pairs).T
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = np.corrcoef(rank(e), rank(a))[0, 1]
    ratio = e / a
    print(f"Spearman {spearman:.3f}, estimate / measured: median {np.median(ratio):.2f}, "
          f"{np.mean((ratio > 0.5) & (ratio < 2)):.0%} within 2x, range {ratio.min():.2f} - {ratio.max():.2f}")
    # measured: Spearman 0.967, median 1.38, 77% within 2x, range 0.18 - 6.7 (8 windows)
    assert spearman > 0.9, spearman
    assert 0.6 < np.median(ratio) < 2, np.median(ratio)
    assert np.mean((ratio > 0.5) & (ratio < 2)) > 0.7 and ratio.min() > 0.1 and ratio.max() < 10


# ---------------------------------------------------------------- size accounting


def test_size_accounting_is_the_exported_bytes(tiny_ckpt, tmp_path):
    """Predicted bytes per module are the artifact's tensor bytes exactly; the fixed part and
    overhead bound the rest of the folder from above, tightly; the header layout is the model's."""
    tok = model_io.load_tokenizer(tiny_ckpt)
    model = model_io.load_model(tiny_ckpt, mx.float32, image_token_id(tok))
    layout = B.layout_from_model(model)
    config = model_io.read_config(tiny_ckpt)
    assert B.layout_from_header(model_io.checkpoint_header(tiny_ckpt), config) == layout
    rng = np.random.default_rng(0)
    plan = {p: (c := B.candidates(shape[1]))[rng.integers(len(c))] for p, shape in layout.modules.items()}
    assert len({s for s in plan.values()}) > 5 and None in plan.values()
    apply_plan(model, plan, scale_dtype=mx.float16)
    out = write_artifact(tmp_path / "a", model, plan, config, tok, dtype=mx.float16,
                         card_info={"plan": plan, "budget": "test"})
    header = model_io.safetensors_header(out / "model.safetensors")
    nbytes = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]  # noqa: E731
    for p, s in plan.items():
        leaves = ("weight",) if s is None else ("weight", "scales", "biases")
        assert sum(nbytes(f"{p}.{leaf}") for leaf in leaves) == B.module_bytes(layout.n(p), s, 2), p
    weights = sum(B.module_bytes(layout.n(p), s, 2) for p, s in plan.items())
    predicted = weights + B.fixed_bytes(layout, 2, support_files_bytes(config, tok, mx.float16))
    actual = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert (out / "bits_per_layer.png").is_file()
    assert actual <= predicted < actual + 80_000, (actual, predicted)
    # --target-bpw's measure is inspect's bits/weight over the quantizable components
    comps = [c for c in artifact_report(out)["components"] if c["component"] != "other"]
    bpw = 8 * sum(c["bytes"] for c in comps) / sum(c["params"] for c in comps)
    assert B.in_target_units(B.Target("bpw", 4, "4"), weights, layout, 2, 0) == pytest.approx(bpw)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def budget_run(tiny_ckpt, calib_text, tmp_path_factory):
    """One `quantize --method rtn --target-size` run on the tiny checkpoint (float32 artifact)."""
    from speedq_mlx.pipeline import QuantizeArgs, quantize

    tmp = tmp_path_factory.mktemp("budget")
    lines = []
    out = quantize(QuantizeArgs(model=str(tiny_ckpt), output=tmp / "art", method="rtn", dtype="float32",
                                target_size="1.2MB", text=calib_text, sensitivity_tokens=64),
                   log=lines.append)
    return out, tmp / "runs" / "art" / "plan.json", lines


def test_budget_is_met_and_mlx_vlm_loads_the_plan(budget_run, tiny_ckpt, image_path):
    from mlx_vlm import load
    from mlx_vlm.utils import prepare_inputs

    out, plan_file, lines = budget_run
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert size <= 1_200_000
    doc = json.loads(plan_file.read_text())
    assert doc["budget"]["estimate"] <= 1_200_000 and doc["lambda"] > 0
    assert any("no image data" in l for l in lines) and any("within the target 1.20 MB" in l for l in lines)
    mods = doc["modules"]
    assert all(m["fixed"] for p, m in mods.items() if m["component"] in ("vision", "projector"))
    assert len({(m["bits"], m["group_size"]) for m in mods.values() if not m["fixed"]}) > 2
    assert all(len(m["candidates"]) >= 10 for m in mods.values() if not m["fixed"])
    # the in-memory model of the plan against the folder mlx_vlm.load reads
    tok = model_io.load_tokenizer(tiny_ckpt)
    model = model_io.load_model(tiny_ckpt, mx.float32, image_token_id(tok))
    plan, n = read_plan_file(plan_file, model, {})
    assert n == len(mods)
    apply_plan(model, plan, scale_dtype=mx.float32)
    loaded, processor = load(str(out))
    prompt = "<|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n"
    inputs = prepare_inputs(processor, images=[str(image_path)], prompts=[prompt])
    ref, got = (np.array(m(inputs["input_ids"], inputs["pixel_values"], mask=None).logits) for m in (model, loaded))
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    modules = dict(loaded.named_modules())
    for path, setting in plan.items():
        if setting is None:
            assert type(modules[path]) in (nn.Linear, nn.Embedding), path
        else:
            assert (modules[path].bits, modules[path].group_size) == setting, path
    card = (out / "README.md").read_text()
    assert "## Quantization plan" in card and "bits_per_layer.png" in card and "--target-size 1.2MB" in card


def test_target_bpw_is_met(tiny_ckpt, calib_text, tmp_path, capsys):
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "--target-bpw", "4.2", "--text",
                            calib_text, "--sensitivity-tokens", "64", "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    comps = [c for c in artifact_report(tmp_path / "a")["components"] if c["component"] != "other"]
    bpw = 8 * sum(c["bytes"] for c in comps) / sum(c["params"] for c in comps)
    assert 4.0 < bpw <= 4.2, bpw


def test_plan_file_round_trip_and_bad_entries(budget_run, tiny_ckpt, tmp_path, capsys):
    doc = json.loads(budget_run[1].read_text())
    doc["modules"]["language_model.model.layers.0.mlp.up_proj"].update(bits=8, group_size=128)
    doc["modules"]["language_model.model.layers.1.self_attn.o_proj"].update(bits=None, group_size=None)
    edited = tmp_path / "plan.json"
    edited.write_text(json.dumps(doc))
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "--plan", edited, "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    q = json.loads((tmp_path / "a" / "config.json").read_text())["quantization"]
    assert q["language_model.model.layers.0.mlp.up_proj"] == {"group_size": 128, "bits": 8, "mode": "affine"}
    header = model_io.safetensors_header(tmp_path / "a" / "model.safetensors")
    assert "language_model.model.layers.1.self_attn.o_proj.scales" not in header
    for p, m in doc["modules"].items():
        if m["bits"] and p not in ("language_model.model.layers.0.mlp.up_proj",):
            assert f"{p}.scales" in header, p
    for change, match in [
        ({"language_model.model.layers.0.mlp.up_proj": {"bits": 7, "group_size": 64}}, "bits = 7, group_size = 64 is not supported"),
        ({"language_model.model.layers.9.mlp.up_proj": {"bits": 4, "group_size": 64}}, "is not a quantizable module"),
        ({"language_model.model.layers.0.mlp.up_proj": {"group_size": 64}}, "expected {\"bits\": N"),
        ({"language_model.model.layers.0.mlp.up_proj": {"bits": "x", "group_size": 64}}, "must be integers"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"modules": change}))
        code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "--plan", bad, "-o", tmp_path / "b"], capsys)
        _refused(code, err, match)
        assert f"plan {bad}" in err and not (tmp_path / "b").exists()


@pytest.fixture
def unloadable_ckpt(tiny_ckpt, tmp_path):
    """The tiny checkpoint with a readable safetensors header and no tensor data: loading
    its weights fails, so an error about the budget proves it came first."""
    bad = tmp_path / "header-only"
    shutil.copytree(tiny_ckpt, bad)
    raw = (bad / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    (bad / "model.safetensors").write_bytes(raw[: 8 + n])
    return bad


@pytest.mark.parametrize("flags, match", [
    (["--target-size", "1kB"], "--target-size 1kB cannot be met: achievable range 0."),
    (["--target-size", "5GB"], "(every module float)"),
    (["--target-bpw", "1.5"], "--target-bpw 1.5 cannot be met: achievable range 3.3"),
    # without image data the vision tower and projector keep the recipe's 4 bits
    (["--target-bpw", "12"], "bits/weight (every module float); 10 modules kept at the recipe's settings"),
])
def test_unreachable_budget_is_refused_before_the_weights_load(unloadable_ckpt, calib_text, tmp_path, capsys,
                                                               flags, match):
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", unloadable_ckpt, *flags, "--text", calib_text,
                            "-o", tmp_path / "out"], capsys)
    _refused(code, err, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, match", [
    (["--target-size", "1MB", "--target-bpw", "3"], "--target-size and --target-bpw are mutually exclusive"),
    (["--target-bpw", "3", "--plan", "x.json"], "--target-bpw and --plan are mutually exclusive"),
    (["--target-size", "1MB"], "--target-size measures each module's sensitivity on calibration data: pass --text"),
    (["--plan", "no-such-plan.json"], "plan file not found: no-such-plan.json"),
    (["--target-size", "lots", "--text", "{text}"], "--target-size 'lots': expected a size"),
    (["--target-bpw", "-1", "--text", "{text}"], "--target-bpw must be a positive number"),
])
def test_budget_flag_errors(tiny_ckpt, calib_text, tmp_path, capsys, flags, match):
    flags = [f.replace("{text}", str(calib_text)) for f in flags]
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, *flags, "-o", tmp_path / "out"], capsys)
    _refused(code, err, match)


def test_images_give_the_vision_tower_a_fisher_signal(tmp_path, capsys):
    """tiny-shapes' bundled conversations carry images: the vision tower and projector are
    chosen for too, with damages measured through the image forward."""
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", "tiny-shapes", "--target-size", "0.45MB",
                              "--sensitivity-images", "4", "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "runs" / "a" / "plan.json").read_text())
    assert doc["sensitivity"]["image_batches"] == 4
    vision = [m for m in doc["modules"].values() if m["component"] in ("vision", "projector")]
    assert vision and not any(m["fixed"] for m in vision)
    assert all(m["candidates"]["2-bit g64"]["damage"] > 0 for m in vision)
    assert sum(f.stat().st_size for f in (tmp_path / "a").iterdir()) <= 450_000


def test_large_modules_are_priced_on_a_row_sample():
    """A module over max_weights is priced on a seeded random subset of its rows with Fisher
    mass, scaled: the same damage as the whole matrix, to a few %."""
    from speedq_mlx.quant.sensitivity import damage, priced_rows

    w = mx.random.normal((20000, 256), key=mx.random.key(0))
    f = mx.random.uniform(shape=w.shape, key=mx.random.key(1)) ** 4
    f[:5000] = 0  # rows the data never reached
    rows, scale = priced_rows(f, 1 << 20)
    assert rows.size == 4096 and int(rows.min()) >= 5000 and scale == pytest.approx(15000 / 4096)
    for setting in [(2, 64), (4, 128)]:
        full = damage(w, f, setting, mx.float16)
        assert scale * damage(w[rows], f[rows], setting, mx.float16) == pytest.approx(full, rel=0.05)
    rows, scale = priced_rows(f, 1 << 30)
    assert rows.size == 15000 and scale == 1.0
