"""Data-parallel SPEED-Q under `mlx.launch` (ring backend, two ranks on 127.0.0.1).

Two ranks (global batch split 2 + 2) must produce the weights one process produces with
the same global batch and seed: stage 1 (AdaRound), stage 2, stage 3 (clip init, cached
teacher top-k, CAKLD gamma, QAT). The two-rank run is interrupted after stage 3's step-2
checkpoint and resumed with --resume and the same world size, which also covers resume.
Skipped, with the reason, when the ring backend cannot start here.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from speedq_mlx.train import distributed as dist

from devkit.ports import free_port_pair

LAUNCH = Path(sys.executable).with_name("mlx.launch")
WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # seconds per launched run (a run takes ~10-15 s here)

QA = [("What colour is it?", "It is mostly blue."), ("Describe the image.", "A small picture."),
      ("Is there text?", "No, there is no text."), ("How many shapes?", "There are three shapes.")]

RECIPE = """\
[quant]
bits = 2
group_size = 64
[quant.embeddings]
bits = 4
group_size = 32
[quant.lm_head]
bits = 4
group_size = 32
[stage1]
images = 8
iters = 10
batch = 4
[stage2]
steps = 3
lr = 1e-3
batch = 4
checkpoint_every = 2
[stage3]
steps = 4
lr = 1e-4
batch = 4
checkpoint_every = 2
gamma_batches = 2
clip_tokens = 32
clip_windows = 4
teacher = "cached"
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SPEEDQ_TEST_STOP_AT"}
    return {**env, "OPENBLAS_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def _run(cmd: list, log: Path, env: dict) -> int:
    """Run with a time limit, the whole process group killed on timeout. stdin stays an open
    pipe: mlx.launch forwards stdin and would spin on an at-EOF one."""
    with open(log, "w") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE, stdout=out,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            return p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            pytest.fail(f"{cmd[0]} ran past {TIMEOUT}s; output in {log}:\n{log.read_text()[-3000:]}")
        finally:
            p.stdin.close()


def _launch(n: int, argv: list, log: Path, env: dict) -> int:
    return _run([LAUNCH, "--backend", "ring", "-n", n, "--starting-port", free_port_pair(), "--",
                 sys.executable, *argv], log, env)


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """Skip the module when two ring ranks cannot talk on this machine."""
    if not LAUNCH.is_file():
        pytest.skip(f"mlx.launch not found beside {sys.executable}")
    tmp = tmp_path_factory.mktemp("ring")
    probe = tmp / "probe.py"
    probe.write_text("import mlx.core as mx\ng = mx.distributed.init()\n"
                     "s = mx.distributed.all_sum(mx.array([g.rank() + 1.0]))\n"
                     "print('ring-ok', g.rank(), g.size(), int(s.item()), flush=True)\n")
    log = tmp / "probe.log"
    try:
        _launch(2, [probe], log, _env())
    except (OSError, pytest.fail.Exception) as e:  # no launcher process, or a timeout in _run
        pytest.skip(f"the ring backend could not start here: {e}")
    text = log.read_text()
    if not all(f"ring-ok {r} 2 3" in text for r in (0, 1)):
        pytest.skip(f"the ring backend could not start two ranks on 127.0.0.1: {text[-500:]}")


def test_single_process_group_is_trivial():
    """Without a launcher every helper is the identity: one process runs as before."""
    assert dist.size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.shard_range(5) == (0, 5) and dist.shard([3, 1, 2]) == [3, 1, 2]
    g = {"w": mx.ones((2, 2))}
    assert dist.average_gradients(g, 1, 7) is g
    assert dist.broadcast_json({"a": 1}) == {"a": 1}
    assert dist.sum_floats(1.5, 2.0) == [1.5, 2.0]


def test_two_ranks_match_one_process_and_resume(ring, tiny_ckpt, image_dir, tmp_path):
    imgs = sorted(image_dir.iterdir())
    conv = tmp_path / "conv.jsonl"
    conv.write_text("\n".join(json.dumps({"image": str(imgs[i]), "conversations": [
        {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        for i, (q, a) in enumerate(QA * 2)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    args = [WORKER, "quantize", "-m", tiny_ckpt, "--recipe", recipe, "--images", image_dir,
            "--data", conv, "--max-tiles", "2", "--dtype", "float32"]

    one = tmp_path / "one"
    code = _run([sys.executable, *args, "-o", one / "out"], tmp_path / "one.log", _env())
    assert code == 0, (tmp_path / "one.log").read_text()[-3000:]

    two = tmp_path / "two"
    log1, log2 = tmp_path / "two-1.log", tmp_path / "two-2.log"
    _launch(2, [*args, "-o", two / "out"], log1, _env(SPEEDQ_TEST_STOP_AT="stage3:2"))
    run = two / "runs" / "out"
    assert not (two / "out").exists(), log1.read_text()[-3000:]
    assert json.loads((run / "stage3_ckpt" / "state.json").read_text())["step"] == 2, \
        log1.read_text()[-3000:]
    _launch(2, [*args, "-o", two / "out", "--resume"], log2, _env())
    text = log2.read_text()
    assert (two / "out" / "model.safetensors").is_file(), text[-3000:]
    assert "stage3: resuming at step 2/4" in text and "stage 1: resuming at block 2/2" in text

    ref_run = one / "runs" / "out"
    for f in ("out/model.safetensors", "runs/out/stage2_ckpt/trainable.safetensors",
              "runs/out/stage3_ckpt/trainable.safetensors", "runs/out/stage1/acts.safetensors"):
        a, b = mx.load(str(one / f)), mx.load(str(two / f))
        assert a.keys() == b.keys(), f
        for k in a:
            x, y = np.array(a[k]), np.array(b[k])
            if x.dtype == np.uint32:  # packed codes: identical
                assert np.array_equal(x, y), f"{f}: codes of {k} differ"
            else:
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * float(np.abs(x).max()),
                                           err_msg=f"{f}: {k}")
    for name in ("stage2", "stage3"):  # the global batch's tokens and loss, all-reduced
        r1 = [json.loads(l) for l in (ref_run / f"{name}_log.jsonl").read_text().splitlines()]
        r2 = [json.loads(l) for l in (run / f"{name}_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in r2] == [r["step"] for r in r1]
        assert [r["tokens"] for r in r2] == [r["tokens"] for r in r1]
        np.testing.assert_allclose([r["loss"] for r in r2], [r["loss"] for r in r1], rtol=1e-5)
        np.testing.assert_allclose([r["grad_norm"] for r in r2], [r["grad_norm"] for r in r1],
                                   rtol=1e-4)
    g1 = json.loads((ref_run / "stage3_gamma.json").read_text())["gamma"]
    g2 = json.loads((run / "stage3_gamma.json").read_text())["gamma"]
    assert g2 == pytest.approx(g1, rel=1e-5)
    c1 = json.loads((ref_run / "clip_init.json").read_text())
    c2 = json.loads((run / "clip_init.json").read_text())
    assert c1.keys() == c2.keys()
    for k in c1:
        assert c2[k]["clip_error"] == pytest.approx(c1[k]["clip_error"], rel=1e-4)
    # rank 0 alone writes: no second copy of anything, and the teacher cache is complete
    assert len(list((run / "teacher_topk").iterdir())) == len(list((ref_run / "teacher_topk").iterdir()))
