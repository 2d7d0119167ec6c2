"""speedq-mlx eval / compare: fidelity math, VQA scoring, bad input, the model card table."""

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from speedq_mlx.data import encode as E, records as R, text as T
from speedq_mlx.evaluation import evaluate, vqa
from speedq_mlx.model import forward
from speedq_mlx.evaluation.evaluate import EvalOptions
from speedq_mlx.model.synthetic import random_weights, tiny_config, train_tokenizer, write_checkpoint

from devkit.testing import ENGLISH_TEXT, run_cli


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory):
    from speedq_mlx.pipeline import QuantizeArgs, quantize

    out = tmp_path_factory.mktemp("eval") / "w2"
    return quantize(QuantizeArgs(method="rtn", model=str(tiny_ckpt), output=out, bits=2), log=lambda *a: None)


@pytest.fixture(scope="module")
def inputs(image_dir, tmp_path_factory):
    """A text file, a conversations file and a VQA file over the fixture images."""
    d = tmp_path_factory.mktemp("evalin")
    (d / "text.txt").write_text("\n\n".join([ENGLISH_TEXT] * 3))
    ims = sorted(image_dir.glob("*.png"))
    with open(d / "conv.jsonl", "w") as f:
        for i, im in enumerate(ims[:3]):
            f.write(json.dumps({"image": str(im), "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"A gradient with noise, number {i}."}]}) + "\n")
    with open(d / "vqa.jsonl", "w") as f:
        f.write(json.dumps({"image": str(ims[0]), "question": "What colour is it?", "answer": "red"}) + "\n")
        f.write(json.dumps({"image": str(ims[1]), "question": "Which?\nA. a cat\nB. a dog", "answer": "B"}) + "\n")
    return d


def _opts(d, **kw):
    base = dict(text=d / "text.txt", data=d / "conv.jsonl", text_tokens=32, text_windows=3,
                batch_size=2, speed_tokens=4, max_tokens=4)
    return EvalOptions(**{**base, **kw})


QUIET = dict(log=lambda *a: None)


# ---------------------------------------------------------------- fidelity


def test_model_against_itself(artifact, inputs):
    res = evaluate.evaluate(str(artifact), str(artifact), _opts(inputs), **QUIET)
    for key in ("text", "data"):
        t = res[key]
        assert t["tokens"] > 0
        assert abs(t["kl"]) < 1e-6
        assert t["top1_agreement"] == 1.0
        assert t["ppl_model"] == pytest.approx(t["ppl_ref"], rel=1e-6)
    assert res["text"]["tokens"] == 3 * 31
    assert res["model"]["size"] == res["reference"]["size"]
    assert res["model"]["speed"]["generated_tokens"] == 4
    m_peak, r_peak = res["model"]["peak_memory_bytes"], res["reference"]["peak_memory_bytes"]
    assert m_peak > 0 and r_peak == pytest.approx(m_peak, rel=0.2)  # the loaded model does not count twice


def _np_stats(lm, lr, ids, mask):
    """Straightforward float64 numpy: perplexities, KL(ref || model), agreement."""
    lm32, lr32 = np.array(lm)[:, :-1], np.array(lr)[:, :-1]
    lm64, lr64 = lm32.astype(np.float64), lr32.astype(np.float64)
    tgt, m = np.array(ids)[:, 1:], np.array(mask)[:, 1:].astype(bool)

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pm, pr = logp(lm64), logp(lr64)
    nll_m = -np.take_along_axis(pm, tgt[..., None], -1)[..., 0][m]
    nll_r = -np.take_along_axis(pr, tgt[..., None], -1)[..., 0][m]
    kl = (np.exp(pr) * (pr - pm)).sum(-1)[m]
    agree = (lm32.argmax(-1) == lr32.argmax(-1))[m]
    return nll_m, nll_r, kl, agree


def test_perplexity_and_kl_match_numpy(artifact, tiny_ckpt, inputs):
    opts = _opts(inputs)
    res = evaluate.evaluate(str(artifact), str(tiny_ckpt), opts, **QUIET)
    m, r = evaluate.open_side(str(artifact)), evaluate.open_side(str(tiny_ckpt))
    evaluate.load_weights(m, mx.float32)
    evaluate.load_weights(r, mx.float32)

    windows = T.token_windows(T.load_text(opts.text), r.tokenizer, 32, 3)
    stats = _np_stats(forward.logits(m.model, windows), forward.logits(r.model, windows),
                      windows, mx.ones(windows.shape))
    enc = E.encoder(r.config, r.tokenizer)
    samples = list(E.iter_samples(R.load_conversations(opts.data), enc))
    b = E.collate(samples, r.tokenizer.pad_token_id)
    img = enc.image_token_id
    dstats = _np_stats(forward.logits(m.model, b["input_ids"], b["pixel_values"], img),
                       forward.logits(r.model, b["input_ids"], b["pixel_values"], img),
                       b["input_ids"], b["loss_mask"])
    for key, (nll_m, nll_r, kl, agree) in (("text", stats), ("data", dstats)):
        t = res[key]
        assert t["tokens"] == nll_m.size
        assert t["ppl_model"] == pytest.approx(np.exp(nll_m.mean()), rel=1e-4)
        assert t["ppl_ref"] == pytest.approx(np.exp(nll_r.mean()), rel=1e-4)
        assert t["kl"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-7)
        assert t["top1_agreement"] == pytest.approx(agree.mean())
        assert t["kl"] > 0 and t["top1_agreement"] < 1  # the 2-bit model does differ


# ---------------------------------------------------------------- VQA scoring


@pytest.mark.parametrize("text, expected", [
    ("The Cat.", "cat"), ("  two  DOGS!", "2 dogs"), ("It's 3.5 m", "its 3.5 m"),
    ("1,000 people", "1000 people"), ("An apple, a pear", "apple pear"), ("twenty-one", "20 1"),
    ("Yes.", "yes"), ("red/blue", "red blue"),
])
def test_normalize(text, expected):
    assert vqa.normalize(text) == expected


def test_parse_options():
    q = "What is it?\nA. a cat\nB. a dog\nC. a bird\nE. skipped (no D)"
    assert vqa.parse_options(q) == {"A": "a cat", "B": "a dog", "C": "a bird"}
    assert vqa.parse_options("Options:\n(A) red\n(B) green") == {"A": "red", "B": "green"}
    assert vqa.parse_options("A. only one option") == {}
    assert vqa.parse_options("How many?") == {}


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("B.", "B"), ("(C) a bird", "C"), ("C: a bird", "C"), ("The answer is B.", "B"),
    ("Answer: (A)", "A"), ("I choose option C", "C"), ("I think B is right", "B"),
    ("a dog", "B"), ("It is a bird, clearly.", "C"), ("A cat sits there", "A"),
    ("A", "A"), ("I don't know", None), ("a cat or a dog", None), ("E", None),
])
def test_extract_choice(reply, expected):
    options = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}
    assert vqa.extract_choice(reply, options) == expected


def test_score_kinds():
    mc = vqa.Item("Which?\nA. cat\nB. dog", ["B"], options={"A": "cat", "B": "dog"})
    assert vqa.score(mc, "B. dog")["correct"] and not vqa.score(mc, "A")["correct"]
    by_text = vqa.Item("Which?", ["dog"], options={"A": "cat", "B": "dog"})
    assert vqa.score(by_text, "(B)")["kind"] == "choice" and vqa.score(by_text, "(B)")["correct"]
    open_q = vqa.Item("How many?", ["two", "2"])
    assert vqa.score(open_q, "Two.")["correct"] and not vqa.score(open_q, "two cats")["correct"]
    yn = vqa.Item("Is it red?", ["Yes"])
    assert vqa.score(yn, "Yes, it is red.")["correct"] and not vqa.score(yn, "No.")["correct"]
    ocr = vqa.Item("Read it.", ["hello world"], match="contains")
    assert vqa.score(ocr, "The text says: Hello, World!")["correct"]
    assert not vqa.score(ocr, "hello worlds")["correct"]


def test_accuracy_with_fake_generate(tmp_path, image_path):
    f = tmp_path / "v.jsonl"
    rows = [{"image": image_path.name, "question": "Colour?", "answer": "red"},
            {"image": image_path.name, "question": "Which?\nA. cat\nB. dog", "answer": "A"},
            {"question": "Count?", "answers": ["3", "three"]},
            {"image": [image_path.name], "question": "Shape?", "answer": "square"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    items = vqa.load_items(f, image_root=image_path.parent)
    replies = {"Colour?": "Red.", "Which?\nA. cat\nB. dog": "B", "Count?": "Three", "Shape?": "a circle"}
    res = vqa.accuracy(items, lambda it: replies[it.question])
    assert (res["items"], res["correct"], res["accuracy"]) == (4, 2, 0.5)
    assert res["choice_items"] == 1 and res["choice_unparsed"] == 0
    assert [r["correct"] for r in res["rows"]] == [True, False, True, False]


def test_vqa_accuracy_of_tiny_model(artifact, tiny_ckpt, image_dir, tmp_path, capsys):
    """Expected answers are what the model itself generates for half of the items."""
    from speedq_mlx.evaluation import generate as greedy
    from speedq_mlx.model.internvl import eos_token_ids

    side = evaluate.open_side(str(artifact))
    evaluate.load_weights(side, mx.float32)
    enc = E.encoder(side.config, side.tokenizer)
    ims = sorted(image_dir.glob("*.png"))[:4]
    questions = ["What is this?", "Describe it.", "Colour?", "How many?"]
    answers = []
    for im, q in zip(ims, questions):
        ids, pv = greedy.prompt(enc, q, [im])
        answers.append(greedy.generate(side.model, enc, ids, pv, eos_token_ids(side.tokenizer), 6).text)
    f = tmp_path / "vqa.jsonl"
    f.write_text("\n".join(json.dumps({"image": str(im), "question": q, "answer": a if i % 2 == 0 else "zebra crossing"})
                           for i, (im, q, a) in enumerate(zip(ims, questions, answers))))
    code, out, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--vqa", f, "--max-tokens", 6,
                              "--speed-tokens", 3, "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["model"]["vqa"]["accuracy"] == 0.5
    assert [r["prediction"] for r in res["model"]["vqa"]["rows"]] == answers
    assert "VQA accuracy (4 items)" in out and "0.5000" in out


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_tokenizer_ckpt(tmp_path_factory):
    tok = train_tokenizer(vocab_size=320)
    cfg = tiny_config(len(tok))
    return write_checkpoint(tmp_path_factory.mktemp("othertok") / "other", cfg, random_weights(cfg, 1), tok)


def _refused(code, err, match):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


def test_bad_inputs(artifact, tiny_ckpt, other_tokenizer_ckpt, inputs, tmp_path, capsys):
    code, _, err = run_cli(["eval", artifact, "-r", other_tokenizer_ckpt, "--text", inputs / "text.txt"], capsys)
    _refused(code, err, "different tokenizers")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "question": "Q?", "answer": "a"}) + "\n")
    code, _, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--vqa", missing], capsys)
    _refused(code, err, "image not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--vqa", empty], capsys)
    _refused(code, err, "no VQA items")
    code, _, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--data", empty], capsys)
    _refused(code, err, "no records")
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--text", tmp_path / "empty.txt"], capsys)
    _refused(code, err, "no text")
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text(json.dumps({"question": "Q?"}) + "\n")
    code, _, err = run_cli(["eval", artifact, "-r", tiny_ckpt, "--vqa", noanswer], capsys)
    _refused(code, err, "needs 'answer'")
    code, _, err = run_cli(["eval", tmp_path / "nothing", "-r", tiny_ckpt], capsys)
    _refused(code, err, "not found")
    code, _, err = run_cli(["quantize", "-m", tiny_ckpt, "--method", "rtn", "-o", tmp_path / "out",
                            "--eval-vqa", missing], capsys)
    _refused(code, err, "image not found")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- export and compare


def test_quantize_eval_writes_card_table(tiny_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "art"
    code, _, err = run_cli(["quantize", "-m", tiny_ckpt, "--method", "rtn", "--bits", 4, "-o", out,
                            "--eval-text", inputs / "text.txt", "--eval-vqa", inputs / "vqa.jsonl"], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| metric | this model | reference |" in card
    assert "text KL(ref \\|\\| model)" not in card  # no raw pipes inside cells
    assert "| VQA accuracy (2 items) |" in card and "text perplexity" in card
    res = json.loads((tmp_path / "runs" / "art" / "eval.json").read_text())
    assert res["reference"]["path"] == str(tiny_ckpt)
    assert res["text"]["tokens"] > 0
    assert card.index("## Evaluation") < card.index("## Use")


def test_compare_table_and_plot(tiny_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "-m", tiny_ckpt, "-o", out, "--text", inputs / "text.txt",
                                 "--text-tokens", 32, "--text-windows", 2, "--speed-tokens", 2,
                                 "--run", "w2=--method rtn --bits 2", "--run", "w4=--method rtn --bits 4",
                                 "--run", "awq4=mlx-vlm:--q-bits 4 --q-group-size 32 --quant-method awq"], capsys)
    assert code == 0, err
    md = (out / "compare.md").read_text()
    assert md.splitlines()[0].startswith("| run | how | size MB | bits/w |") and "text KL" in md
    assert [l.split("|")[1].strip() for l in md.splitlines()[2:6]] == ["reference", "w2", "w4", "awq4"]
    summary = json.loads((out / "compare.json").read_text())
    w2, w4, awq = summary["runs"]
    assert w2["size_mb"] < w4["size_mb"] and w2["bits_per_weight"] < w4["bits_per_weight"]
    assert summary["reference"]["text_kl"] == 0.0 and w2["text_kl"] > 0
    assert awq["text_kl"] is not None
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(["compare", "-m", tiny_ckpt, "-o", out, "--run", "w2=--method rtn --bits 2"], capsys)
    _refused(code, err, "already exists")
    code, _, err = run_cli(["compare", "-m", tiny_ckpt, "-o", tmp_path / "c3", "--run", "x=--no-such-flag"], capsys)
    _refused(code, err, "no-such-flag")


# ---------------------------------------------------------------- VLMEvalKit TSV


def test_vlmevalkit_tsv_conversion(tmp_path):
    from speedq_mlx.evaluation.vlmeval import convert

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buf, format="JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    header = "index\timage\tquestion\thint\tA\tB\tC\tanswer\tcategory"
    lines = [header,
             f"1\t{b64}\tWhat is shown?\tLook closely.\tcat\tdog\t\tB\tcoarse",
             "2\t1\tIs it grey?\t\t\t\t\tYes\tyn",
             f"3\t{b64}\tRead the text.\t\t\t\t\t['hello', 'Hello!']\tocr",
             f"4\t{b64}\tUnanswered?\t\t\t\t\t\ttest"]
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    items_file = convert(tsv, tmp_path / "conv")
    items = vqa.load_items(items_file)
    assert len(items) == 3
    mc, yn, ocr = items
    assert mc.options == {"A": "cat", "B": "dog"} and vqa.gold_choice(mc) == "B"
    assert mc.question.startswith("Hint: Look closely.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\n")
    assert vqa.score(mc, "B")["correct"]
    assert yn.question.endswith("Please answer yes or no.") and yn.images[0].name == "2.jpg"
    assert ocr.match == "contains" and ocr.answers == ["hello", "Hello!"]
    assert vqa.score(ocr, "it says hello")["correct"]
