"""Stages 2 and 3 on the tiny model: exact export, exact resume, teacher modes, NaN guard."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from speedq_mlx.data import encode as E, records as R
from speedq_mlx.model import io as model_io
from speedq_mlx.quant.clip import gram_blocks, search_clip
from speedq_mlx.errors import SpeedQError
from speedq_mlx.export.artifact import write_artifact
from speedq_mlx.model.forward import logits as vlm_logits
from speedq_mlx.data.sources import TrainData
from speedq_mlx.model.internvl import image_token_id
from speedq_mlx.pipeline import prepare_stage3
from speedq_mlx.stages.common import StageConfig, collate
from speedq_mlx.stages.stage2_projector import run_stage2
from speedq_mlx.stages.common import enable_grad_checkpoint
from speedq_mlx.stages.stage3_language import run_stage3
from speedq_mlx.stages.teacher import Teacher
from speedq_mlx.quant.plan import apply_plan, build_plan, quantized_paths
from speedq_mlx.quant.layers import QuantLinear
from speedq_mlx.quant import format as Q
from speedq_mlx.train.loop import TrainConfig

from devkit.testing import make_run, run_cli

QA = [("What colour is it?", "It is mostly blue."), ("Describe the image.", "A small picture."),
      ("Is there text?", "No, there is no text."), ("How many shapes?", "There are three shapes.")]


@pytest.fixture(scope="module")
def setup(tiny_ckpt, image_dir):
    tok = model_io.load_tokenizer(tiny_ckpt)
    config = model_io.read_config(tiny_ckpt)
    enc = E.encoder(config, tok, max_tiles=2)
    images = sorted(image_dir.iterdir())
    records = [R.Record(messages=[{"role": "user", "content": "<image>\n" + q},
                                     {"role": "assistant", "content": a}], images=[img], source=f"t:{i}")
               for i, ((q, a), img) in enumerate(zip(QA * 2, images))]
    samples = [E.encode(r, enc) for r in records]
    return tok, config, samples


def _models(ckpt, tok, settings):
    img = image_token_id(tok)
    student = model_io.load_model(ckpt, mx.float32, img)
    fp = model_io.load_model(ckpt, mx.float32, img)
    teacher = Teacher(lambda: fp)
    plan = build_plan(student, settings)
    return student, teacher, plan, img


W2 = {"vision": (4, 64), "projector": (4, 64), "language": (2, 64), "embeddings": (4, 32), "lm_head": (4, 32)}


def _stage3(tmp, ckpt, tok, samples, steps=6, resume=False, log=None, qparams_lr=None, micro_batch=0,
            **kw):
    student, teacher, plan, img = _models(ckpt, tok, W2)
    cfg = StageConfig(train=TrainConfig(steps=steps, lr=3e-3, batch=2, checkpoint_every=3,
                                        qparams_lr=qparams_lr, micro_batch=micro_batch),
                      gamma_batches=2, clip_tokens=16, clip_windows=2, **kw)
    calib = [collate(samples[:4], tok.pad_token_id)]
    prepare_stage3(student, plan, cfg, None)
    run = make_run(ckpt, tmp, resume, log=log or (lambda *a: None), out_dtype=None)
    res = run_stage3(run, student, teacher, plan, TrainData(samples), calib, cfg)
    return student, plan, res


def test_stage3_exports_exactly_and_learns(tiny_ckpt, setup, tmp_path):
    from mlx_vlm import load

    tok, config, samples = setup
    student, plan, res = _stage3(tmp_path / "run", tiny_ckpt, tok, samples, steps=12)
    rows = [json.loads(l) for l in (tmp_path / "run" / "stage3_log.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]  # it trains
    assert {"loss_ce", "loss_distill", "lr", "tokens_per_s"} <= set(rows[0])
    gamma = json.loads((tmp_path / "run" / "stage3_gamma.json").read_text())["gamma"]
    assert 0 < gamma < 1 and res["gamma"] == gamma
    assert (tmp_path / "run" / "stage3_loss.png").stat().st_size > 1000
    paths = set(quantized_paths(student))
    assert "language_model.model.layers.0.mlp.down_proj" in paths and "mlp1.1" in paths
    apply_plan(student, {p: s for p, s in plan.items() if p not in paths}, scale_dtype=None)
    out = write_artifact(tmp_path / "art", student, plan, config, tok, dtype=mx.float32)
    loaded, _ = load(str(out))
    b = collate(samples[:1], tok.pad_token_id)
    ref = vlm_logits(student, b["input_ids"], b["pixel_values"])
    got = vlm_logits(loaded, b["input_ids"], b["pixel_values"])
    assert float(mx.abs(got - ref).max()) < 1e-4 * float(mx.abs(ref).max())


def _weights(model):
    return {p: np.array(m.weight) for p, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_stage3_resume_gives_same_final_weights(tiny_ckpt, setup, tmp_path):
    tok, _, samples = setup
    full, _, _ = _stage3(tmp_path / "full", tiny_ckpt, tok, samples, steps=6)

    class Kill(Exception):
        pass

    import speedq_mlx.train.loop as TL

    original = TL._value_metrics_grads
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # dies during step 5, after the step-3 checkpoint
            raise Kill
        return original(*a, **k)

    TL._value_metrics_grads = dying
    try:
        with pytest.raises(Kill):
            _stage3(tmp_path / "cut", tiny_ckpt, tok, samples, steps=6)
    finally:
        TL._value_metrics_grads = original
    state = json.loads((tmp_path / "cut" / "stage3_ckpt" / "state.json").read_text())
    assert state["step"] == 3
    with pytest.raises(SpeedQError, match="pass --resume"):
        _stage3(tmp_path / "cut", tiny_ckpt, tok, samples, steps=6)
    msgs = []
    resumed, _, _ = _stage3(tmp_path / "cut", tiny_ckpt, tok, samples, steps=6, resume=True, log=msgs.append)
    assert "stage3: resuming at step 3/6" in msgs
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    rows = [json.loads(l) for l in (tmp_path / "cut" / "stage3_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_cached_topk_teacher_equals_live_when_k_is_vocab(tiny_ckpt, setup, tmp_path):
    tok, _, samples = setup
    V = len(tok)
    _stage3(tmp_path / "live", tiny_ckpt, tok, samples, steps=2, teacher="live")
    _stage3(tmp_path / "cached", tiny_ckpt, tok, samples, steps=2, teacher="cached", topk=V)
    live = [json.loads(l) for l in (tmp_path / "live" / "stage3_log.jsonl").read_text().splitlines()]
    cached = [json.loads(l) for l in (tmp_path / "cached" / "stage3_log.jsonl").read_text().splitlines()]
    assert cached[0]["loss_distill"] == pytest.approx(live[0]["loss_distill"], rel=1e-3)
    assert len(list((tmp_path / "cached" / "teacher_topk").iterdir())) == len(samples)


def test_nan_guard_stops_with_last_good_checkpoint(tiny_ckpt, setup, tmp_path):
    tok, _, samples = setup
    with pytest.raises(SpeedQError, match="non-finite loss or gradient at step 3 .*step 3"):
        student, teacher, plan, img = _models(tiny_ckpt, tok, W2)
        cfg = StageConfig(train=TrainConfig(steps=6, lr=1e-3, batch=2, checkpoint_every=3),
                          gamma_batches=1, clip_init=False)
        import speedq_mlx.train.loop as TL

        original = TL._value_metrics_grads

        def poisoned(model, loss_fn, batch):
            (loss, m, n), g = original(model, loss_fn, batch)
            if TL_calls.append(1) or len(TL_calls) == 4:
                loss = loss * float("nan")
            return (loss, m, n), g

        TL_calls = []
        TL._value_metrics_grads = poisoned
        try:
            prepare_stage3(student, plan, cfg, None)
            run_stage3(make_run(tiny_ckpt, tmp_path, out_dtype=None), student, teacher, plan,
                       TrainData(samples), [], cfg)
        finally:
            TL._value_metrics_grads = original
    assert json.loads((tmp_path / "stage3_ckpt" / "state.json").read_text())["step"] == 3


def test_stage2_trains_only_the_projector(tiny_ckpt, setup, tmp_path):
    tok, _, samples = setup
    student, teacher, plan, img = _models(tiny_ckpt, tok, W2)
    before = {k: np.array(v) for k, v in student.language_model.parameters()["model"]["layers"][0]["mlp"]["up_proj"].items()}
    w0 = np.array(student.mlp1[1].weight)
    cfg = StageConfig(train=TrainConfig(steps=3, lr=1e-2, batch=2, checkpoint_every=10), distill_weight=0.0)
    run_stage2(make_run(tiny_ckpt, tmp_path), student, teacher, TrainData(samples), cfg)
    assert not np.allclose(np.array(student.mlp1[1].weight), w0)
    after = student.language_model.parameters()["model"]["layers"][0]["mlp"]["up_proj"]
    np.testing.assert_array_equal(np.array(after["weight"]), before["weight"])


def test_clip_search_never_worse_than_minmax():
    w = mx.random.normal((96, 256), key=mx.random.key(0)) * 0.05
    x = mx.random.normal((64, 256), key=mx.random.key(1))
    s, b, st = search_clip(w, gram_blocks(x, 64), 2, 64)
    assert st["clip_error"] <= st["rtn_error"] * 0.9
    out_err = lambda s_, b_: float(((x @ (Q.fake_quantize(w, s_, b_, 2, 64) - w).T) ** 2).sum())
    s0, b0 = Q.minmax_params(w, 2, 64)
    assert out_err(s, b) < out_err(s0, b0)
    # the search's objective: per-group errors through the group's own inputs (block-diagonal)
    d = np.array(Q.fake_quantize(w, s, b, 2, 64) - w).reshape(96, 4, 64)
    xg = np.array(x).reshape(64, 4, 64)
    blockdiag = sum(((xg[:, g] @ d[:, g].T) ** 2).sum() for g in range(4))
    assert blockdiag == pytest.approx(st["clip_error"], rel=1e-3)


def test_cli_full_speedq_with_data_file(tiny_ckpt, image_dir, tmp_path, capsys):
    conv = tmp_path / "conv.jsonl"
    imgs = sorted(image_dir.iterdir())
    conv.write_text("\n".join(json.dumps({"image": str(imgs[i]), "conversations": [
        {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        for i, (q, a) in enumerate(QA * 2)))
    args = ["quantize", "-m", tiny_ckpt, "--recipe", "recipes/quick.toml", "--images", image_dir,
            "--data", conv, "--max-tiles", "2", "-o", tmp_path / "out"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "out"
    for name in ("stage1_report.json", "stage2_log.jsonl", "stage3_log.jsonl", "clip_init.json"):
        assert (run / name).is_file(), name
    assert "stages run: 1,2,3" in (tmp_path / "out" / "README.md").read_text()
    code, _, err = run_cli([*args[:-2], "-o", tmp_path / "o2", "--data", tmp_path / "missing.jsonl"], capsys)
    assert code == 2 and "data file not found" in err


def test_grad_checkpoint_gives_the_same_gradients(tiny_ckpt, setup):
    import mlx.nn as nn

    from speedq_mlx.stages import losses as D

    tok, _, samples = setup
    b = collate(samples[:2], tok.pad_token_id)

    def grads():
        m = model_io.load_model(tiny_ckpt, mx.float32, image_token_id(tok))
        m.freeze()
        m.language_model.unfreeze()
        loss = lambda mm: D.cross_entropy(vlm_logits(mm, b["input_ids"], b["pixel_values"]),
                                          b["input_ids"], b["loss_mask"])
        return m, nn.value_and_grad(m, loss)(m)

    from mlx.utils import tree_flatten

    m1, (l1, g1) = grads()
    layer_cls = type(m1.language_model.model.layers[0])
    original_call = layer_cls.__call__
    try:
        enable_grad_checkpoint(m1.language_model.model.layers[0])
        m2, (l2, g2) = grads()
    finally:
        layer_cls.__call__ = original_call
        layer_cls._speedq_checkpointed = False
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for (k, a), (_, c) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=1e-4, atol=1e-6, err_msg=k)


def test_frozen_quantized_layers_are_quantized_once(tiny_ckpt, setup, tmp_path, monkeypatch):
    """Stage 3 quantizes the frozen 4-bit embeddings and lm_head once, not every step: a 151k-row head re-quantized every step made a QAT step
    of InternVL2-1B 5x dearer than a float one."""
    from speedq_mlx.quant import layers
    from speedq_mlx.quant.layers import FakeQuant

    monkeypatch.setattr(layers, "COMPUTE_FROM_CODES", False)  # the dense copy (CPU default)
    tok, _, samples = setup
    seen = []
    real = FakeQuant._quantize_frozen

    def counting(self):
        seen.append((id(self), type(self).__name__))
        return real(self)

    monkeypatch.setattr(FakeQuant, "_quantize_frozen", counting)
    _stage3(tmp_path, tiny_ckpt, tok, samples, steps=4)
    ids = [i for i, _ in seen]
    assert len(ids) == len(set(ids)), "a frozen layer was quantized again"
    assert sorted(name for _, name in seen) == ["QuantEmbedding", "QuantLinear"]  # embeddings, lm_head


def test_stage3_gptq_init_keeps_its_grid_and_exports_exactly(tiny_ckpt, setup, tmp_path):
    """init = "gptq": the latent weights start on GPTQ's codes (every linear's calibration
    output error below min/max round-to-nearest), the grid stays fixed during QAT when
    scales are not learned, and the artifact computes what was trained."""
    from mlx_vlm import load

    tok, config, samples = setup
    student, plan, _ = _stage3(tmp_path / "run", tiny_ckpt, tok, samples, steps=3, init="gptq")
    stats = json.loads((tmp_path / "run" / "gptq_init.json").read_text())
    language = [p for p, s in plan.items() if s and p.startswith("language_model.model.layers.")]
    assert sorted(stats) == sorted(language)
    assert all(v["gptq_error"] < v["rtn_error"] for v in stats.values())
    m = dict(student.named_modules())[language[0]]
    assert "scales" in m and not any(k.endswith(("scales", "biases")) for k, _ in tree_flatten(m.trainable_parameters()))
    s, b = m.qparams()
    grid = Q.dequantize(Q.codes(m.weight, s, b, m.bits, m.group_size), s, b, m.group_size)
    assert float(mx.abs(grid - m.dequantized_weight()).max()) == 0.0
    paths = set(quantized_paths(student))
    apply_plan(student, {p: s for p, s in plan.items() if p not in paths}, scale_dtype=None)
    out = write_artifact(tmp_path / "art", student, plan, config, tok, dtype=mx.float32)
    loaded, _ = load(str(out))
    batch = collate(samples[:1], tok.pad_token_id)
    ref = vlm_logits(student, batch["input_ids"], batch["pixel_values"])
    got = vlm_logits(loaded, batch["input_ids"], batch["pixel_values"])
    assert float(mx.abs(got - ref).max()) < 1e-4 * float(mx.abs(ref).max())


def test_learned_qparams_get_their_own_learning_rate(tiny_ckpt, setup, tmp_path):
    """qparams_lr: the scales move at their own rate (0 keeps them where the init put them)."""
    tok, _, samples = setup
    student, plan, _ = _stage3(tmp_path / "run", tiny_ckpt, tok, samples, steps=3, init="clip",
                               learn_qparams=True, qparams_lr=0.0)
    stats = json.loads((tmp_path / "run" / "clip_init.json").read_text())
    m = dict(student.named_modules())[sorted(stats)[0]]
    fresh, _, _ = _stage3(tmp_path / "run0", tiny_ckpt, tok, samples, steps=0, init="clip", learn_qparams=True)
    m0 = dict(fresh.named_modules())[sorted(stats)[0]]
    np.testing.assert_array_equal(np.array(m.scales), np.array(m0.scales))
    assert not np.array_equal(np.array(m.weight), np.array(m0.weight))  # the weights did train


def test_cli_stage3_on_text_windows_alone(tiny_ckpt, tmp_path, capsys):
    """--stages 3 with text_windows and --text but no conversations: plain-text QAT with
    distillation (held-out windows pick the checkpoint); without --text it is refused first."""
    from devkit.testing import ENGLISH_TEXT

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([ENGLISH_TEXT] * 6))
    recipe = tmp_path / "r.toml"
    recipe.write_text(Path("recipes/quick.toml").read_text().replace(
        "[stage3]\n", "[stage3]\ntext_windows = 6\ntext_tokens = 32\ninit = \"gptq\"\n"))
    args = ["quantize", "-m", tiny_ckpt, "--recipe", recipe, "--stages", "3", "-o", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "pass --text FILE" in err and not (tmp_path / "out").exists()
    code, out, err = run_cli([*args, "--text", text], capsys)
    assert code == 0, err
    assert "stage 3 trains on --text windows" in out and "+ 5 text windows of 32 tokens" in out
    rows = [json.loads(l) for l in (tmp_path / "runs" / "out" / "stage3_log.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and "held_out_loss" in rows[-1]


def test_cached_teacher_is_released_before_qat(tiny_ckpt, setup, tmp_path):
    """teacher = "cached": the top-k of the training and held-out samples are computed once,
    the full-precision model is released, and QAT (held-out scoring included) never asks
    for it again."""
    tok, _, samples = setup
    student, _, plan, img = _models(tiny_ckpt, tok, W2)
    fp = model_io.load_model(tiny_ckpt, mx.float32, img)
    asked = []
    teacher = Teacher(lambda: asked.append(len(asked)) or fp)
    cfg = StageConfig(train=TrainConfig(steps=4, lr=1e-3, batch=2, checkpoint_every=2),
                      gamma_batches=2, teacher="cached", topk=16, clip_init=False)
    prepare_stage3(student, plan, cfg, None)
    teacher.release = lambda real=teacher.release: (asked.append("released"), real())
    run_stage3(make_run(tiny_ckpt, tmp_path), student, teacher, plan, TrainData(samples[:6], samples[6:]), [], cfg)
    assert asked == [0, "released"]  # loaded once, for the cache pass, then released
    assert len(list((tmp_path / "teacher_topk_held_out").iterdir())) == 2
    rows = [json.loads(l) for l in (tmp_path / "stage3_log.jsonl").read_text().splitlines()]
    assert all("held_out_loss" in r for r in rows if r["step"] % 2 == 0)


def test_row_logits_are_the_full_logits_at_those_rows(tiny_ckpt, setup):
    from speedq_mlx.model.forward import row_logits

    tok, _, samples = setup
    model = model_io.load_model(tiny_ckpt, mx.float32, image_token_id(tok))
    b = collate(samples[:3], tok.pad_token_id)
    rows = b["rows"][:2]
    full = vlm_logits(model, b["input_ids"], b["pixel_values"])
    got = row_logits(model, b["input_ids"], b["pixel_values"], image_token_id(tok), rows)
    assert got.shape == (int(np.array(b["loss_mask"])[:, 1:].sum()), full.shape[-1])
    np.testing.assert_allclose(np.array(got), np.array(full[rows[0], rows[1]]), rtol=1e-5, atol=1e-5)


def test_micro_batches_train_as_the_whole_batch_does(tiny_ckpt, setup, tmp_path):
    """micro_batch = 1 accumulates token-weighted gradients: the same steps as batch 2 in one pass."""
    tok, _, samples = setup
    whole, _, res_whole = _stage3(tmp_path / "whole", tiny_ckpt, tok, samples, steps=3)
    parts, _, res_parts = _stage3(tmp_path / "parts", tiny_ckpt, tok, samples, steps=3, micro_batch=1)
    rows = [[json.loads(l) for l in (tmp_path / d / "stage3_log.jsonl").read_text().splitlines()]
            for d in ("whole", "parts")]
    for a, b in zip(*rows):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    w = dict(tree_flatten(whole.trainable_parameters()))
    p = dict(tree_flatten(parts.trainable_parameters()))
    assert w.keys() == p.keys()
    for k in w:
        assert mx.allclose(w[k], p[k], atol=1e-4, rtol=1e-3), k
    lines = []  # micro_batch is not in the fingerprint: the finished run resumes with another
    _stage3(tmp_path / "whole", tiny_ckpt, tok, samples, steps=3, resume=True, micro_batch=1, log=lines.append)
    assert "stage3: resuming at step 3/3" in lines


def _state_after_init(tmp, ckpt, tok, samples, monkeypatch, **kw) -> dict:
    """Every fake-quantized linear's parameters as QAT would start from them."""
    import speedq_mlx.stages.stage3_language as S3

    seen = {}

    def capture(run, model, *a, **k):
        seen.update({f"{p}.{n}": np.array(v) for p, m in model.named_modules() if isinstance(m, QuantLinear)
                     for n, v in tree_flatten(m.parameters())})
        return {}

    monkeypatch.setattr(S3, "train_stage", capture)
    _stage3(tmp, ckpt, tok, samples, **kw)
    return seen


@pytest.mark.parametrize("init", ["clip", "gptq"])
def test_a_resumed_stage3_loads_its_init_instead_of_redoing_it(tiny_ckpt, setup, tmp_path, monkeypatch, init):
    import speedq_mlx.stages.stage3_language as S3

    tok, _, samples = setup
    first = _state_after_init(tmp_path, tiny_ckpt, tok, samples, monkeypatch, init=init, learn_qparams=True)
    fresh = _state_after_init(tmp_path / "other", tiny_ckpt, tok, samples, monkeypatch, init="none")
    changed = [k for k in first if k.endswith(".weight") and not np.array_equal(first[k], fresh[k])]
    assert changed  # the init moved latent weights, so loading it back is a real check

    def refuse(*a, **k):
        raise AssertionError("the init was computed again")

    monkeypatch.setattr(S3, "clip_init", refuse)
    monkeypatch.setattr(S3, "gptq_init", refuse)
    with pytest.raises(SpeedQError, match="pass --resume"):
        _state_after_init(tmp_path, tiny_ckpt, tok, samples, monkeypatch, init=init, learn_qparams=True)
    msgs = []
    again = _state_after_init(tmp_path, tiny_ckpt, tok, samples, monkeypatch, init=init, learn_qparams=True,
                              resume=True, log=msgs.append)
    assert any(m.startswith(f"stage 3: {init} init loaded from") for m in msgs)
    assert again.keys() == first.keys()
    for k in first:
        np.testing.assert_array_equal(again[k], first[k], err_msg=k)
    with pytest.raises(SpeedQError, match="other stage-3 .* init settings"):
        _state_after_init(tmp_path, tiny_ckpt, tok, samples, monkeypatch, init=init, learn_qparams=True,
                          resume=True, clip_skip=[])
