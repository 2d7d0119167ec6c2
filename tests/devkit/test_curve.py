"""benchmarks.curve: the training-token curve read back from a peers run's own logs."""

import json
import math

from benchmarks import curve


def _peers_run(tmp_path, rows, start_loss):
    folder = tmp_path / "qwen" / "w2"
    (folder / "runs" / "speedq").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "runs" / "speedq" / "stage3_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "logs" / "speedq.log").write_text(f"stage3:  0%|\rstage3: held-out loss at step 0: {start_loss}\nstage3: 5%")
    return folder


def test_points_count_tokens_up_to_each_checkpoint(tmp_path):
    rows = [{"step": s, "tokens": 100 + s, "tokens_per_s": 10.0 + s,
             **({"held_out_loss": 1.0 / s} if s % 2 == 0 else {})} for s in range(1, 5)]
    _peers_run(tmp_path, rows, 0.75)
    c = curve.run_curve(tmp_path, "qwen", 2, "speedq")
    assert c["points"] == [(0, 0, 0.75), (2, 101 + 102, 0.5), (4, 101 + 102 + 103 + 104, 0.25)]
    assert c["cpu_tokens_per_s"] in (12.0, 13.0)  # the median step's


def test_run_without_steps_has_no_curve(tmp_path):
    _peers_run(tmp_path, [], 0.75)
    assert curve.run_curve(tmp_path, "qwen", 2, "speedq") is None


def test_power_law_fit_recovers_exponent_and_projection():
    points = [(0, 0, 9.9)] + [(s, t, 3.0 * t ** -0.25) for s, t in ((1, 1e3), (2, 1e4), (3, 1e5))]
    c, alpha = curve.fit_power_law(points)
    assert math.isclose(c, 3.0, rel_tol=1e-9) and math.isclose(alpha, 0.25, rel_tol=1e-9)
    proj = curve.project({"points": points, "kjv_kl": 2 * points[-1][2]}, 5e8, mac_tflops=10.0)
    tokens = 3600 * 10e12 / (8 * 5e8)
    assert proj["mac_tokens_per_hour"] == round(tokens)
    assert math.isclose(proj["held_out_loss_at_mac_hour"], 3.0 * tokens ** -0.25, rel_tol=1e-3)
    assert math.isclose(proj["kjv_kl_at_mac_hour"], 2 * 3.0 * tokens ** -0.25, rel_tol=1e-3)


def test_matmul_params_of_qwen2_5_0_5b():
    """Qwen2.5-0.5B: 24 x (q, o 896^2; k, v 896 x 128; MLP 3 x 896 x 4864) + the 151936 x 896 head."""
    cfg = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
           "num_key_value_heads": 2, "vocab_size": 151936}
    assert curve.lm_matmul_params(cfg) == 24 * (2 * 896**2 + 2 * 896 * 128 + 3 * 896 * 4864) + 151936 * 896
    assert round(curve.lm_matmul_params(cfg) / 1e6) == 494  # 358M decoder linears + 136M head
