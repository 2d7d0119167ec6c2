"""tiny-shapes: the scene task, the bundled trained model, and the offline quick start."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from devkit.tiny_shapes import scenes as S
from speedq_mlx.model.registry import bundled_data, local_model, recipes_dir

from devkit.testing import run_cli


def _centre(i: int, jitter, size=S.IMAGE_SIZE):
    dx, dy, _ = jitter[i]
    half = size // 2
    return (i % 2) * half + half // 2 + dx, (i // 2) * half + half // 2 + dy


def test_rendered_scenes_match_their_labels():
    """The pixel at each object's centre has the object's colour; empty cells show the background."""
    for index in range(40):
        s = S.scene(S.TRAIN_SEED, index)
        im = np.asarray(S.render(s))
        for i, cell in enumerate(S.CELLS):
            x, y = _centre(i, s.jitter)
            if cell in s.objects:
                assert tuple(im[y, x]) == S.COLOURS[s.objects[cell][0]], (index, cell)
            elif not (s.word and s.word[0] == cell):
                assert tuple(im[y, x]) == s.background


def test_scene_streams_are_seeded_and_disjoint():
    a = np.asarray(S.render(S.scene(S.TRAIN_SEED, 3)))
    assert np.array_equal(a, np.asarray(S.render(S.scene(S.TRAIN_SEED, 3))))
    train = {np.asarray(S.render(S.scene(S.TRAIN_SEED, i))).tobytes() for i in range(200)}
    test = {np.asarray(S.render(S.scene(S.TEST_SEED, i))).tobytes() for i in range(200)}
    assert not train & test


def test_answers_follow_from_the_scene():
    s = S.Scene({"top left": ("red", "circle"), "bottom right": ("red", "square")},
                ("top right", "cat"), (250, 250, 250), [(0, 0, 30)] * 4)
    qa = {q: a for _, q, a in S.questions(s)}
    assert qa["How many shapes are there?"] == "two"
    assert qa["How many red shapes are there?"] == "two"
    assert qa["How many blue shapes are there?"] == "zero"
    assert qa["What colour is the circle?"] == "red"
    assert "What shape is the red one?" not in qa  # two red objects: ambiguous, not asked
    assert qa["Where is the red square?"] == "bottom right"
    assert qa["Is there a red circle?"] == "yes" and qa["Is there a blue circle?"] == "no"
    assert qa["What word is written?"] == "cat"
    assert (qa["What is in the top left?"], qa["What is in the top right?"],
            qa["What is in the bottom left?"]) == ("red circle", "cat", "nothing")
    rng = random.Random(0)
    drawn = {S.sample_question(s, rng)[0] for _ in range(200)}
    assert drawn == {k for k, _, _ in S.questions(s)}


def test_generic_prompt_is_what_mlx_vlm_sends(tmp_path):
    """Training's second prompt format is token for token what mlx_vlm.generate builds."""
    from mlx_vlm.prompt_utils import apply_chat_template

    from speedq_mlx.data import encode as E
    from speedq_mlx.model.synthetic import random_weights, write_checkpoint
    from devkit.tiny_shapes.train import build_tokenizer, encode_qa, model_config
    from speedq_mlx.data.teacher_answers import mlx_processor

    tok = build_tokenizer()
    config = model_config(len(tok))
    write_checkpoint(tmp_path, config, random_weights(config), tok)
    proc = mlx_processor(tmp_path)
    im = S.render(S.scene(S.TEST_SEED, 0))
    q = "What colour is the circle?"

    prompt = apply_chat_template(proc, {"model_type": "internvl_chat"}, q, num_images=1)
    ref = proc(text=prompt, images=[im])
    enc = E.encoder(config, tok)
    sample = encode_qa(enc.processor.preprocess([im])["pixel_values"][0], [(q, "red")], True, enc)
    n = np.asarray(ref["input_ids"]).shape[1]
    assert sample.input_ids[:n] == np.asarray(ref["input_ids"])[0].tolist()
    assert tok.decode(sample.input_ids[n:]) == "red<|im_end|>"
    assert np.allclose(np.asarray(ref["pixel_values"]), np.asarray(sample.pixel_values), atol=1e-6)


def test_training_script_writes_a_loadable_model_and_bundle(tmp_path):
    from speedq_mlx.model.io import load_model
    from devkit.tiny_shapes.train import train
    from speedq_mlx.evaluation.vqa import load_items

    rep = train(tmp_path / "out", tmp_path / "run", steps=4, batch=4, lr=1e-3, eval_every=2, log=lambda m: None)
    assert [e["step"] for e in rep["eval"]] == [2, 4]
    assert 5e5 < rep["params"] < 8e5  # 64x4 ViT, 64x6 LM, 534-token vocabulary
    model = load_model(tmp_path / "out" / "model")
    assert model.config.vision_config.image_size == S.IMAGE_SIZE
    items = load_items(tmp_path / "out" / "vqa_test.jsonl")
    assert len(items) == 400 and all(it.images[0].is_file() for it in items)
    lines = (tmp_path / "out" / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == 1024 and json.loads(lines[0])["conversations"][1]["from"] == "gpt"


# ---------------------------------------------------------------- the bundled model

needs_bundle = pytest.mark.skipif(not (bundled_data("tiny-shapes")["data"]).is_file(),
                                  reason="tiny-shapes assets not built (python -m devkit.tiny_shapes.train)")


@pytest.fixture(scope="module")
def fp_accuracy():
    from speedq_mlx.evaluation.evaluate import EvalOptions, evaluate

    opts = EvalOptions(vqa=bundled_data("tiny-shapes")["vqa"], max_samples=80, max_tokens=6, speed_tokens=2)
    return evaluate("tiny-shapes", "tiny-shapes", opts, log=lambda m: None)["model"]["vqa"]["accuracy"]


@needs_bundle
def test_bundled_model_sees(fp_accuracy):
    """The shipped full-precision model answers held-out scene questions (ChatML prompts)
    far above what the questions alone give (a blind model: about 0.3); measured 0.875."""
    assert fp_accuracy > 0.75


@needs_bundle
def test_stock_mlx_vlm_generate_answers():
    """`mlx_vlm.generate` with its own prompt format gets the answers right (the processor is
    built as mlx_vlm.load builds it, without the prompt about the checkpoint's remote code)."""
    from mlx_vlm import generate
    from mlx_vlm.prompt_utils import apply_chat_template

    from speedq_mlx.model.internvl import image_token_id
    from speedq_mlx.model.io import load_model, load_tokenizer
    from speedq_mlx.data.teacher_answers import mlx_processor
    from speedq_mlx.evaluation.vqa import load_items, score

    folder = local_model("tiny-shapes")
    model = load_model(folder, image_token_index=image_token_id(load_tokenizer(folder)))
    proc = mlx_processor(folder)
    items = load_items(bundled_data("tiny-shapes")["vqa"], limit=20)
    correct = 0
    for it in items:
        prompt = apply_chat_template(proc, model.config, it.question, num_images=1)
        out = generate(model, proc, prompt, [str(it.images[0])], max_tokens=6, verbose=False)
        correct += score(it, out.text)["correct"]
    assert correct >= 16  # measured 19 of 20


@needs_bundle
def test_quantize_uses_bundled_data_and_mlx_vlm_loads_it(fp_accuracy, tmp_path, capsys):
    """quantize without --images/--data uses the bundled data (quick recipe: a smoke run of
    all three stages); mlx_vlm loads the artifact and eval scores it against tiny-shapes."""
    from mlx_vlm import load

    from speedq_mlx.evaluation.evaluate import EvalOptions, evaluate

    code, out, err = run_cli(["quantize", "--model", "tiny-shapes", "--bits", "4", "--recipe", recipes_dir() / "quick.toml",
                              "--output", tmp_path / "sq4", "--max-samples", "64"], capsys)
    assert code == 0, err
    assert "bundled with tiny-shapes" in out
    model, _ = load(str(tmp_path / "sq4"))
    assert mx.all(mx.isfinite(model.language_model.model.embed_tokens.scales)).item()
    opts = EvalOptions(vqa=bundled_data("tiny-shapes")["vqa"], max_samples=80, max_tokens=6, speed_tokens=2)
    res = evaluate(str(tmp_path / "sq4"), "tiny-shapes", opts, log=lambda m: None,
                   reference_side={"vqa": {"accuracy": fp_accuracy}})
    assert res["model"]["vqa"]["accuracy"] > fp_accuracy - 0.15


def test_training_refuses_a_run_dir_of_other_sizes(tmp_path, capsys):
    """A run folder started at one size is not silently continued at another: one-line error, exit 2."""
    from speedq_mlx.model.synthetic import random_weights, write_checkpoint
    from devkit.tiny_shapes.train import build_tokenizer, main, model_config

    tok = build_tokenizer()
    config = model_config(len(tok))
    write_checkpoint(tmp_path / "run" / "init", config, random_weights(config), tok)
    with pytest.raises(SystemExit) as e:
        main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--language", "128x2", "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "other sizes" in err[-1] and "another --run-dir" in err[-1]
    with pytest.raises(SystemExit) as e:
        main(["--init-from", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--steps", "1"])
    assert e.value.code == 2 and "no model to continue" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_config_defaults_are_the_shipped_model_and_sizes_parse():
    """The default sizes rebuild the shipped config; --vision/--language take HIDDENxLAYERS."""
    import argparse

    from speedq_mlx.model.registry import ASSETS
    from devkit.tiny_shapes.train import model_config, parse_size

    shipped = json.loads((ASSETS / "tiny-shapes" / "model" / "config.json").read_text())
    built = model_config(shipped["llm_config"]["vocab_size"])
    for tower in ("vision_config", "llm_config"):
        for k, v in built[tower].items():
            if not k.endswith("_token_id"):  # token ids come from the tokenizer when written
                assert shipped[tower][k] == v, (tower, k)
    assert parse_size("64x6") == (64, 6)
    small = model_config(100, (64, 3), (64, 6))
    assert small["llm_config"]["num_attention_heads"] == 2 and small["llm_config"]["num_key_value_heads"] == 1
    for bad in ("96x4", "64", "ax2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
