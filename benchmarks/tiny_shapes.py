"""tiny-shapes: VQA test accuracy of the full-precision model, RTN at 2/3/4 bits and
SPEED-Q at 2 and 4 bits (the recipes in recipes/tiny-shapes-w*.toml), per question kind,
with the wall time of each quantization. Prints a table, writes JSON.

    python -m benchmarks.tiny_shapes [--runs rtn-w2,speedq-w2] [--out out/bench-tiny-shapes]
                                     [--test-scenes 1000]

By default it scores the bundled test file (200 scenes, 400 questions: standard error about
0.02). --test-scenes N renders the first N scenes of the same test stream (the bundled 200
among them, two questions each) for tighter figures.

Everything is quantized in the RTN runs (vision tower, projector, language linears at the
run's bits, group 64; embeddings and lm_head 4-bit g32, the paper's default), so the RTN
and SPEED-Q rows at the same bits have the same bit allocation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


RUNS = {
    "rtn-w2": ["--method", "rtn", "--bits", "2"],
    "rtn-w3": ["--method", "rtn", "--bits", "3"],
    "rtn-w4": ["--method", "rtn", "--bits", "4"],
    "speedq-w2": ["--bits", "2"],
    "speedq-w4": ["--bits", "4"],
}


def per_kind(vqa_result: dict, vqa_file: Path) -> dict:
    """Accuracy per question kind (the test file's "kind" field), from the per-item rows."""
    kinds = [json.loads(l)["kind"] for l in vqa_file.read_text().splitlines() if l.strip()]
    hits = defaultdict(list)
    for row in vqa_result["rows"]:
        line = int(row["source"].rsplit(":", 1)[1])
        hits[kinds[line - 1]].append(row["correct"])
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}


def test_file(folder: Path, n_scenes: int) -> Path:
    """A VQA file of the first n_scenes of the test stream, written once into folder."""
    from devkit.tiny_shapes import scenes as S

    path = folder / "vqa_test.jsonl"
    if not path.is_file():
        items = S.write_split(folder, S.TEST_SEED, n_scenes, 2, "test")
        path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out", type=Path, default=Path("out/bench-tiny-shapes"))
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tiny_shapes.json")
    ap.add_argument("--reuse", action="store_true", help="evaluate existing artifacts in --out")
    ap.add_argument("--test-scenes", type=int, default=0,
                    help="score N scenes of the test stream instead of the bundled 200")
    a = ap.parse_args()
    if a.test_scenes < 0:
        ap.error("--test-scenes must be 0 (the bundled test file) or a positive number of scenes")

    from speedq_mlx.cli import main as cli
    from speedq_mlx.evaluation.evaluate import EvalOptions, evaluate
    from speedq_mlx.model.registry import bundled_data

    vqa_file = bundled_data("tiny-shapes")["vqa"]
    if a.test_scenes:
        vqa_file = test_file(a.out / f"test-{a.test_scenes}", a.test_scenes)
    opts = EvalOptions(vqa=vqa_file, max_tokens=8, speed_tokens=8)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    results, correct, ref = {}, {}, None
    for name in [r for r in a.runs.split(",") if r]:
        out = a.out / name
        seconds = None
        if not (a.reuse and out.is_dir()):
            t0 = time.time()
            try:
                cli(["quantize", "--model", "tiny-shapes", *RUNS[name], "--output", str(out), "--overwrite"])
            except SystemExit as e:
                if e.code:
                    raise
            seconds = round(time.time() - t0, 1)
        res = evaluate(str(out), "tiny-shapes", opts, log=log, reference_side=ref)
        ref = res["reference"]
        correct[name] = [row["correct"] for row in res["model"]["vqa"]["rows"]]
        results[name] = {"accuracy": res["model"]["vqa"]["accuracy"], "quantize_s": seconds,
                         "bits_per_weight": res["model"]["size"]["bits_per_weight"],
                         "size_bytes": res["model"]["size"]["size_on_disk_bytes"],
                         "per_kind": per_kind(res["model"]["vqa"], vqa_file)}
    if ref is not None:
        results = {"full-precision": {"accuracy": ref["vqa"]["accuracy"], "quantize_s": None,
                                      "bits_per_weight": ref["size"]["bits_per_weight"],
                                      "size_bytes": ref["size"]["size_on_disk_bytes"],
                                      "per_kind": per_kind(ref["vqa"], vqa_file)}, **results}
    kinds = sorted({k for r in results.values() for k in r["per_kind"]})
    print(f"{'run':16} {'acc':>6} {'bpw':>5} {'MB':>6} {'quant s':>8}  " + " ".join(f"{k[:9]:>9}" for k in kinds))
    for name, r in results.items():
        print(f"{name:16} {r['accuracy']:6.3f} {r['bits_per_weight']:5.2f} {r['size_bytes'] / 1e6:6.2f} "
              f"{r['quantize_s'] if r['quantize_s'] is not None else '-':>8}  "
              + " ".join(f"{r['per_kind'].get(k, float('nan')):9.3f}" for k in kinds))
    for name in correct:
        rtn = name.replace("speedq", "rtn")
        if name.startswith("speedq") and rtn in correct:
            # paired: the same questions, so count the answers SPEED-Q fixed and broke vs RTN
            fixed = sum(s and not r for s, r in zip(correct[name], correct[rtn]))
            broken = sum(r and not s for s, r in zip(correct[name], correct[rtn]))
            results[name]["vs_rtn"] = {"fixed": fixed, "broken": broken}
            print(f"{name} vs {rtn}: {fixed} answers fixed, {broken} broken")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"vqa_items": len(ref["vqa"]["rows"]) if ref else 0, "runs": results}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
