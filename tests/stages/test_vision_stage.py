"""Stage 1: learned rounding of the vision tower beats round-to-nearest, resumes exactly,
and exports into an artifact whose vision output mlx-vlm reproduces."""

import json

import mlx.core as mx
import numpy as np
import pytest

from speedq_mlx.model import io as model_io
from speedq_mlx.errors import SpeedQError
from speedq_mlx.export.artifact import write_artifact
from speedq_mlx.data.images import find_images
from speedq_mlx.quant.plan import apply_plan, build_plan
from speedq_mlx.quant.layers import QuantLinear
from speedq_mlx.model.forward import image_features
from speedq_mlx.model.internvl import image_token_id
from speedq_mlx.stages.stage1_vision import Stage1Config, calibration_pixels, run_stage1

from devkit.testing import make_run

FLOAT = {"projector": None, "language": None, "embeddings": None, "lm_head": None}


def _setup(ckpt, image_dir, bits, cfg):
    tok = model_io.load_tokenizer(ckpt)
    model = model_io.load_model(ckpt, mx.float32, image_token_id(tok))
    plan = build_plan(model, {"vision": (bits, 64), **FLOAT})
    pixels = calibration_pixels(model_io.read_config(ckpt), find_images(image_dir), cfg, mx.float32)
    return model, plan, pixels, tok


def vision_features(model, pixels):
    return image_features(model, pixels, channels_last=True)


def _rtn_features(ckpt, plan, pixels):
    model = model_io.load_model(ckpt, mx.float32)
    apply_plan(model, plan, scale_dtype=mx.float16)
    return vision_features(model, pixels)


def _feature_ratio(ckpt, image_dir, bits, tmp_path, cfg):
    model, plan, pixels, _ = _setup(ckpt, image_dir, bits, cfg)
    ref = vision_features(model, pixels)
    rep = run_stage1(make_run(ckpt, tmp_path / f"run{bits}"), model, plan, pixels, cfg)
    for b in rep["blocks"]:
        assert b["final_mse"] < b["rtn_mse"], b  # every block beats round-to-nearest
    err_stage1 = float(((vision_features(model, pixels) - ref) ** 2).mean())
    err_rtn = float(((_rtn_features(ckpt, plan, pixels) - ref) ** 2).mean())
    return err_stage1 / err_rtn, rep


@pytest.mark.parametrize("bits", [2, 4])
def test_stage1_beats_rtn_on_tiny_model(tiny_ckpt, image_dir, tmp_path, bits):
    ratio, rep = _feature_ratio(tiny_ckpt, image_dir, bits, tmp_path, Stage1Config(iters=150))
    print(f"tiny W{bits}: vision-feature MSE stage1/RTN = {ratio:.3f}")
    assert ratio < 0.8
    saved = json.loads((tmp_path / f"run{bits}" / "stage1_report.json").read_text())
    assert [b["block"] for b in saved["blocks"]] == [0, 1]
    assert all({"rtn_mse", "init_mse", "final_mse", "seconds"} <= set(b) for b in saved["blocks"])


def test_stage1_never_ends_worse_than_its_start(tiny_ckpt, image_dir, tmp_path):
    """The starting grid is never worse than min/max, and a rounding search that ends worse
    than its start (here: 3 Adam steps at lr 5 scramble the rounding) is undone."""
    cfg = Stage1Config(iters=3, lr=5.0, warmup=0.0)
    model, plan, pixels, _ = _setup(tiny_ckpt, image_dir, 2, cfg)
    rep = run_stage1(make_run(tiny_ckpt, tmp_path / "run"), model, plan, pixels, cfg)
    for b in rep["blocks"]:
        # (the min/max start rounds like RTN up to AdaRound's float h(V) at exact halves)
        assert b["init_mse"] <= b["rtn_mse"] * 1.001, b
        assert b["kept_init_rounding"], b
        assert b["final_mse"] == pytest.approx(b["init_mse"], rel=1e-5), b
        assert set(b["grids"].values()) <= {"rtn", "minmax", "mse"} and len(b["grids"]) == 4


@pytest.mark.real_weights
@pytest.mark.parametrize("bits", [2, 4])
def test_stage1_beats_rtn_on_real_weights_model(smollm_ckpt, image_dir, tmp_path, bits):
    ratio, _ = _feature_ratio(smollm_ckpt, image_dir, bits, tmp_path, Stage1Config(iters=150))
    print(f"smollm W{bits}: vision-feature MSE stage1/RTN = {ratio:.3f}")
    assert ratio < 0.8


def _codes(model):
    out = {}
    for p, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[p] = np.array(m.packed()["weight"])
    return out


def test_resume_after_interruption_gives_same_codes(tiny_ckpt, image_dir, tmp_path):
    cfg = Stage1Config(iters=60)
    model, plan, pixels, _ = _setup(tiny_ckpt, image_dir, 2, cfg)
    run_stage1(make_run(tiny_ckpt, tmp_path / "full"), model, plan, pixels, cfg)
    reference = _codes(model)

    class Interrupt(Exception):
        pass

    def die_at_block_1(msg):
        if msg.startswith("stage 1 block 1"):
            raise Interrupt

    model, plan, pixels, _ = _setup(tiny_ckpt, image_dir, 2, cfg)
    with pytest.raises(Interrupt):
        run_stage1(make_run(tiny_ckpt, tmp_path / "cut", log=die_at_block_1), model, plan, pixels, cfg)
    state = json.loads((tmp_path / "cut" / "stage1" / "state.json").read_text())
    assert len(state["blocks"]) == 1
    with pytest.raises(SpeedQError, match="pass --resume"):
        run_stage1(make_run(tiny_ckpt, tmp_path / "cut"), *_setup(tiny_ckpt, image_dir, 2, cfg)[:3], cfg)
    model, plan, pixels, _ = _setup(tiny_ckpt, image_dir, 2, cfg)
    messages = []
    run_stage1(make_run(tiny_ckpt, tmp_path / "cut", resume=True, log=messages.append), model, plan,
               pixels, cfg)
    assert messages[0] == "stage 1: resuming at block 1/2"
    resumed = _codes(model)
    assert reference.keys() == resumed.keys() and len(reference) == 8
    for k in reference:
        np.testing.assert_array_equal(reference[k], resumed[k], err_msg=k)
    other = Stage1Config(iters=61)
    with pytest.raises(SpeedQError, match="other stage-1 settings"):
        run_stage1(make_run(tiny_ckpt, tmp_path / "cut", resume=True),
                   *_setup(tiny_ckpt, image_dir, 2, other)[:3], other)


def test_exported_stage1_vision_matches_in_memory(tiny_ckpt, image_dir, tmp_path):
    from mlx_vlm import load

    cfg = Stage1Config(iters=40)
    model, plan, pixels, tok = _setup(tiny_ckpt, image_dir, 2, cfg)
    run_stage1(make_run(tiny_ckpt, tmp_path / "run", out_dtype=None), model, plan, pixels, cfg)
    out = write_artifact(tmp_path / "art", model, plan, model_io.read_config(tiny_ckpt), tok,
                         dtype=mx.float32)
    loaded, _ = load(str(out))
    ref, got = vision_features(model, pixels), vision_features(loaded, pixels)
    assert float(mx.abs(got - ref).max()) < 1e-4 * float(mx.abs(ref).max())
    assert type(loaded.vision_model.encoder.layers[0].attn.qkv).__name__ == "QuantizedLinear"


def test_cli_speedq_stage1(tiny_ckpt, image_dir, tmp_path, capsys):
    from devkit.testing import run_cli

    recipe = tmp_path / "r.toml"
    recipe.write_text("[quant]\nbits = 2\ngroup_size = 64\n[stage1]\niters = 20\nlayers = [\"qkv\", \"fc1\"]\n")
    args = ["quantize", "-m", tiny_ckpt, "--method", "speedq", "--stages", "1", "--recipe", recipe,
            "-o", tmp_path / "out"]
    code, _, err = run_cli([*args[:-2], "-o", tmp_path / "x"], capsys)
    assert code == 2 and "pass --images DIR" in err
    code, out, err = run_cli([*args, "--images", image_dir], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "out" / "stage1_report.json").read_text())
    assert report["config"]["layers"] == ["qkv", "fc1"] and len(report["blocks"]) == 2
    assert "stages run: 1" in (tmp_path / "out" / "README.md").read_text()
    code, _, err = run_cli([*args[:-2], "-o", tmp_path / "y", "--images", tmp_path / "nothing"], capsys)
    assert code == 2 and "image folder not found" in err
