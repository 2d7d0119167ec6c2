"""The shared train loop keeps the checkpoint with the lowest held-out loss (model
selection for stages 2 and 3), across an interruption too."""

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from speedq_mlx.run import RunFolder
from speedq_mlx.train import loop
from speedq_mlx.train.loop import TrainConfig, train

CFG = TrainConfig(steps=12, lr=0.1, warmup=0.0, weight_decay=0.0, grad_clip=0.0, batch=1,
                  checkpoint_every=2)


def _setup(val_target: float):
    """A 4-weight model trained towards 1.0 from 0.0; held out, the best weight is val_target."""
    model = nn.Linear(4, 1, bias=False)
    model.weight = mx.zeros((1, 4))

    def loss_fn(m, batch):
        return ((m.weight - 1.0) ** 2).mean(), {}, 1.0

    def held_out():
        return float(((model.weight - val_target) ** 2).mean())

    return model, loss_fn, held_out


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "s_log.jsonl").read_text().splitlines()]


def test_training_that_only_hurts_held_out_ends_where_it_started(tmp_path):
    model, loss_fn, held_out = _setup(-0.2)
    res = train(model, loss_fn, lambda step: mx.zeros(1), CFG, RunFolder(tmp_path), "s", log=lambda *a: None,
                held_out=held_out)
    assert res["best_step"] == 0 and res["held_out_loss"] == pytest.approx(0.04)
    assert mx.array_equal(model.weight, mx.zeros((1, 4)))
    # every checkpoint was scored, and training did move away from the start
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows if "held_out_loss" in r] == list(range(2, 13, 2))
    assert rows[-1]["held_out_loss"] > 0.5


def test_best_checkpoint_in_the_middle_survives_an_interruption(tmp_path):
    model, loss_fn, held_out = _setup(0.5)
    full = train(model, loss_fn, lambda step: mx.zeros(1), CFG, RunFolder(tmp_path / "full"), "s", log=lambda *a: None,
                 held_out=held_out)
    assert 0 < full["best_step"] < CFG.steps
    assert held_out() == pytest.approx(full["held_out_loss"])  # the model holds the best step
    assert full["held_out_loss"] < _rows(tmp_path / "full")[-1]["held_out_loss"]

    model, loss_fn, held_out = _setup(0.5)

    def stop(step):
        if step == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, loss_fn, lambda step: mx.zeros(1), CFG, RunFolder(tmp_path / "cut"), "s", log=lambda *a: None,
              on_step=stop, held_out=held_out)
    model, loss_fn, held_out = _setup(0.5)
    res = train(model, loss_fn, lambda step: mx.zeros(1), CFG, RunFolder(tmp_path / "cut", resume=True), "s",
                log=lambda *a: None, held_out=held_out)
    assert res["best_step"] == full["best_step"]
    assert held_out() == pytest.approx(full["held_out_loss"])


def test_accumulated_micro_batches_equal_one_pass_over_their_union():
    """Token-weighted: a per-token mean loss and its gradients over [a, b] equal those on a+b."""
    from speedq_mlx.train.loop import accumulate

    model = nn.Linear(3, 2)
    x = mx.random.normal((7, 3), key=mx.random.key(1))
    y = mx.random.normal((7, 2), key=mx.random.key(2))

    def loss_fn(m, batch):
        bx, by = batch
        per_row = ((m(bx) - by) ** 2).sum(axis=-1)
        return per_row.mean(), {"abs": mx.abs(per_row).mean()}, float(bx.shape[0])

    (loss, metrics, n), grads = accumulate(model, loss_fn, (x, y))
    (loss_p, metrics_p, n_p), grads_p = accumulate(model, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert n == n_p == 7
    assert float(loss_p) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics_p["abs"]) == pytest.approx(float(metrics["abs"]), rel=1e-6)
    for key in ("weight", "bias"):
        assert mx.allclose(grads[key], grads_p[key], atol=1e-6)


def test_a_negative_micro_batch_is_refused_in_one_line():
    from speedq_mlx.errors import SpeedQError

    with pytest.raises(SpeedQError, match=r"recipe \[stage3\] micro_batch must be >= 0"):
        TrainConfig.from_section({"micro_batch": -1}, "stage3")
    assert TrainConfig.from_section({"micro_batch": 2}, "stage3").micro_batch == 2


def _step_transient(monkeypatch, by_module: bool) -> float:
    """Peak memory of an optimiser step above the steady state (weights + Adam moments),
    in units of the trainable parameters' size, for a 12-layer MLP with two micro-batches."""
    if not by_module:
        monkeypatch.setattr(loop, "eval_by_module", lambda named: None)
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)])
    mx.eval(model.parameters())
    size = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    x = mx.random.normal((2, 8, 512))
    steady = {}

    def after_step(step):
        if step == 1:  # the moments exist from here on
            steady["bytes"] = mx.get_active_memory()
            mx.reset_peak_memory()

    cfg = TrainConfig(steps=3, lr=1e-3, warmup=0.0, batch=2, checkpoint_every=100, micro_batch=1)
    with tempfile.TemporaryDirectory() as d:
        train(model, lambda m, b: ((m(b) ** 2).mean(), {}, 1.0), lambda step: [x[:1], x[1:]], cfg,
              RunFolder(Path(d)), "s", log=lambda *a: None, on_step=after_step)
    return (mx.get_peak_memory() - steady["bytes"]) / size


def test_a_step_evaluated_module_by_module_peaks_lower_than_all_at_once(monkeypatch):
    """The update of a 0.5B language model's latents must not hold a second copy of weights,
    moments and gradients at once (the 12 GB budget of stage 3); all at once it is ~1.9x."""
    all_at_once = _step_transient(monkeypatch, by_module=False)
    monkeypatch.undo()
    by_module = _step_transient(monkeypatch, by_module=True)
    assert all_at_once > 1.8
    assert by_module < 1.7
