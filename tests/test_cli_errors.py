"""Bad input: one-line error on stderr, exit code 2, and nothing written."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from speedq_mlx.model.synthetic import random_weights, tiny_config, train_tokenizer, write_checkpoint

from devkit.testing import run_cli


def _assert_refused(code, out, err, tmp_path, match):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.fixture
def corrupt_ckpt(tiny_ckpt, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all" * 10)
    return bad


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    """FFN width 160: divisible by 32 but not by 64."""
    tok = train_tokenizer()
    cfg = tiny_config(len(tok))
    cfg["llm_config"]["intermediate_size"] = 160
    out = tmp_path_factory.mktemp("odd") / "odd"
    return write_checkpoint(out, cfg, random_weights(cfg, 0, np.float32), tok)


@pytest.mark.parametrize("args,match", [
    (["-m", "no-such-model", "-b", "2"], "unknown model name 'no-such-model'; known names: internvl2-1b"),
    (["-m", "./missing/folder", "-b", "2"], "model folder not found"),
    (["-m", "{ckpt}", "-b", "7"], "--bits 7 is not supported by MLX affine quantization (choose one of 2, 3, 4, 5, 6, 8)"),
    (["-m", "no-such-model", "-b", "7"], "--bits 7 is not supported"),  # the flag, before any model
    (["-m", "{ckpt}", "-b", "2", "-g", "16"], "--group-size 16 is not supported"),
    (["-m", "{ckpt}", "-b", "2", "--method", "gptq"], "unknown method"),
    (["-m", "{ckpt}", "-b", "2", "--dtype", "int8"], "unknown dtype"),
    (["-m", "{ckpt}", "-b", "2", "--method", "speedq", "--held-out", "1"], "--held-out must be in [0, 1), got 1.0"),
])
def test_bad_arguments(tiny_ckpt, tmp_path, capsys, args, match):
    args = [a.replace("{ckpt}", str(tiny_ckpt)) for a in args]
    code, out, err = run_cli(["quantize", "--method", "rtn", *args, "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, match)


def test_corrupt_safetensors(corrupt_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", corrupt_ckpt, "-b", "2", "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, "cannot load weights from")


def test_indivisible_dimension_is_refused_before_writing(odd_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", odd_ckpt, "-b", "2", "-g", "64", "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, "input dimension 160 for language_model.model.layers.0.mlp.down_proj")
    assert "refusing to run" in err
    # group 32 divides it: the same model then quantizes
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", odd_ckpt, "-b", "2", "-g", "32", "-o", tmp_path / "ok"], capsys)
    assert code == 0, err


def test_existing_output_needs_overwrite(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "-b", "2", "-o", out], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "-b", "2", "-o", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_not_internvl_and_already_quantized(tiny_ckpt, tmp_path, capsys):
    import json

    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["llm_config"]["model_type"] = "internlm2"
    (other / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", other, "-b", "2", "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, "language model type 'internlm2' is not supported")
    assert run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "-b", "2", "-o", tmp_path / "q"], capsys)[0] == 0
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", tmp_path / "q", "-b", "2", "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, "already quantized")


def test_console_script_exit_code(tmp_path):
    """The installed entry point (through OpenBLAS re-exec) reports errors the same way."""
    env_cmd = [sys.executable, "-m", "speedq_mlx", "quantize", "--method", "rtn", "-m", "nope", "-b", "2", "-o", str(tmp_path / "out")]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown model name 'nope'")


@pytest.mark.parametrize("args,match", [
    (["quantize"], "Missing"), (["quantize", "-m", "x", "--bits", "abc"], "valid integer"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_short_not_tracebacks(args, match, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert match in err and "Traceback" not in err and "site-packages" not in err


@pytest.mark.parametrize("table, where", [
    ("[quant.language]\nbits = 7\n", "[quant.language]: bits = 7, group_size = 64 is not supported"),
    ("[quant.overrides]\n\"mlp1.*\" = { bits = 4, group_size = 16 }\n", "[quant.overrides] 'mlp1.*': bits = 4, group_size = 16"),
    ("[quant]\nbits = 9\n", "[quant]: bits = 9, group_size = 64 is not supported"),
])
def test_recipe_setting_mlx_cannot_hold_names_the_recipe_key(tiny_ckpt, tmp_path, capsys, table, where):
    recipe = tmp_path / "r.toml"
    recipe.write_text(table)
    code, out, err = run_cli(["quantize", "--method", "rtn", "-m", tiny_ckpt, "--recipe", recipe,
                              "-o", tmp_path / "out"], capsys)
    _assert_refused(code, out, err, tmp_path, where)
