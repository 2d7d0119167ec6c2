"""The data layer: records -> InternVL prompts, tokens, tiles and answer masks."""

import io
import json
import re

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from speedq_mlx.data import encode as E, hf as H, records as R, text as T
from speedq_mlx.data import images
from speedq_mlx.model.chat_template import HERMES_2_SYSTEM
from speedq_mlx.errors import SpeedQError
from speedq_mlx.model.io import load_tokenizer, read_config
from speedq_mlx.data.teacher_answers import PROMPTS, teacher_answers

SIZES = {"square": (64, 64), "wide": (300, 60), "tall": (40, 200), "tiny": (5, 3)}


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def enc(tiny_ckpt, tok):
    return E.encoder(read_config(tiny_ckpt), tok)


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    """Images of several shapes (different tilings) in one folder."""
    folder = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(1)
    for name, (w, h) in SIZES.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{name}.png")
    return folder


RECORDS = [
    {"image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red circle left of a blue square."},
        {"from": "human", "value": "How many shapes?"},
        {"from": "gpt", "value": "There are two."}]},
    {"conversations": [
        {"from": "human", "value": "Say hello."},
        {"from": "gpt", "value": "Hello world."}]},
    {"image": ["square.png", "tall.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich one is bigger?"},
        {"from": "gpt", "value": "The square is bigger."}]},
]


def answers(record):
    return [m["content"] for m in record.messages if m["role"] == "assistant"]


def masked_text(tok, sample):
    return tok.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_round_trip_tokens_tiles_and_answer_mask(fmt, pics, enc, tok):
    write = write_json if fmt == "json" else write_jsonl
    records = R.load_conversations(write(pics / f"d.{fmt}", RECORDS))
    assert [r.images for r in records] == [[pics / "wide.png"], [], [pics / "square.png", pics / "tall.png"]]
    for r in records:
        s = E.encode(r, enc)
        # the loss covers exactly the answers, each with its closing <|im_end|>
        assert masked_text(tok, s) == "".join(a + "<|im_end|>" for a in answers(r))
        assert len(s.input_ids) == len(s.loss_mask)
        tiles = [images.tiles(enc.processor, p) for p in r.images]
        assert s.n_tiles == [t.shape[0] for t in tiles]
        assert s.input_ids.count(enc.image_token_id) == enc.num_image_token * sum(s.n_tiles)
        if tiles:
            assert mx.array_equal(s.pixel_values, mx.concatenate(tiles, axis=0))
        else:
            assert s.pixel_values is None


def test_image_paths_relative_to_image_root(pics, tmp_path):
    records = R.load_conversations(write_jsonl(tmp_path / "d.jsonl", RECORDS[:1]), image_root=pics)
    assert records[0].images == [pics / "wide.png"]


@pytest.mark.parametrize("name", list(SIZES))
def test_image_token_count_matches_mlx_vlm_processor(name, pics, enc, tok):
    from mlx_vlm.models.internvl_chat.processor import InternVLChatProcessor

    vlm = InternVLChatProcessor(image_processor=enc.processor, tokenizer=tok, image_size=56,
                                patch_size=14, downsample_ratio=0.5)
    theirs = vlm(text=["<image>\nWhat is it?"], images=[images.open_image(pics / f"{name}.png")])
    n_theirs = np.array(theirs["input_ids"]).tolist()[0].count(enc.image_token_id)
    record = R.Record([{"role": "user", "content": "<image>\nWhat is it?"},
                          {"role": "assistant", "content": "A thing."}], [pics / f"{name}.png"])
    s = E.encode(record, enc)
    assert s.input_ids.count(enc.image_token_id) == n_theirs == enc.num_image_token * s.n_tiles[0]
    assert mx.array_equal(s.pixel_values, theirs["pixel_values"][0])
    if name == "square":
        assert s.n_tiles == [1]  # one tile, no thumbnail
    else:
        assert s.n_tiles[0] > 1  # dynamic tiles + thumbnail


def test_rendered_prompt_equals_hermes2_by_hand(pics, enc, tok):
    assert enc.template == "Hermes-2" and enc.num_image_token == 4  # (56/14)^2 * 0.5^2
    record = R.load_conversations(write_json(pics / "one.json", RECORDS[:1]))[0]
    s = E.encode(record, enc)
    n = s.n_tiles[0]
    expected = ("<|im_start|>system\n" + HERMES_2_SYSTEM + "<|im_end|>"
                "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * (4 * n) + "</img>\nWhat is in the picture?<|im_end|>"
                "<|im_start|>assistant\nA red circle left of a blue square.<|im_end|>"
                "<|im_start|>user\nHow many shapes?<|im_end|>"
                "<|im_start|>assistant\nThere are two.<|im_end|>")
    text, spans = E.render_training_text(
        E.expand_images(record.messages, s.n_tiles, enc.num_image_token), enc.template)
    assert text == expected
    assert [text[a:b] for a, b in spans] == [a + "<|im_end|>" for a in answers(record)]
    assert tok.decode(s.input_ids) == expected  # tokens round-trip to the prompt


def test_truncation_never_cuts_an_image(pics, enc, tok, capsys):
    record = R.load_conversations(write_json(pics / "t.json", RECORDS[:1]))[0]
    full = E.encode(record, enc)
    last_img = len(full.input_ids) - 1 - full.input_ids[::-1].index(enc.image_token_id)
    n = len(full.input_ids)
    cut = E.encode(record, enc, max_length=n - 3)  # inside the second answer
    assert cut.input_ids == full.input_ids[:n - 3] and cut.loss_mask == full.loss_mask[:n - 3]
    assert cut.n_tiles == full.n_tiles and mx.array_equal(cut.pixel_values, full.pixel_values)
    assert E.encode(record, enc, max_length=last_img + 1) is None  # would cut </img>
    assert E.encode(record, enc, max_length=last_img + 5) is None  # no answer left
    assert E.encode(record, enc, max_length=len(full.input_ids)).input_ids == full.input_ids
    text_only = R.load_conversations(write_json(pics / "t2.json", RECORDS[1:2]))[0]
    got = list(E.iter_samples([record, text_only], enc, max_length=last_img, progress=False))
    assert [s.source for s in got] == [text_only.source]
    err = capsys.readouterr().err
    assert "warning: dropped 1 of 2 samples (50%)" in err and "raise --max-length" in err
    many = [text_only] * 40 + [record]  # 1 of 41 (2%): a note, not a warning
    assert len(list(E.iter_samples(many, enc, max_length=last_img, progress=False))) == 40
    assert "skipped 1 of 41 samples (2%)" in capsys.readouterr().err


def test_training_tiles_follow_internvl_finetuning():
    from speedq_mlx.model import internvl

    assert internvl.training_tiles({"max_dynamic_patch": 12}, None) == 6
    assert internvl.training_tiles({"max_dynamic_patch": 1}, None) == 1
    assert internvl.training_tiles({"max_dynamic_patch": 12}, 12) == 12


def test_collate_right_pads(pics, enc, tok):
    records = R.load_conversations(write_json(pics / "c.json", RECORDS))
    samples = [E.encode(r, enc) for r in records]
    b = E.collate(samples, tok.pad_token_id)
    L = max(len(s.input_ids) for s in samples)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (3, L)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert b["input_ids"][i, :n].tolist() == s.input_ids
        assert b["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (L - n)
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert b["loss_mask"][i].tolist() == s.loss_mask + [0] * (L - n)
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    assert mx.array_equal(b["pixel_values"], mx.concatenate(tiles, axis=0))
    # one tile's worth of <IMG_CONTEXT> per tile, in batch (row-major) order
    assert int((b["input_ids"] == enc.image_token_id).sum()) == enc.num_image_token * b["pixel_values"].shape[0]
    assert E.collate(samples[1:2], tok.pad_token_id)["pixel_values"] is None


def test_batches_cover_records_in_seeded_order(pics, enc):
    records = R.load_conversations(write_json(pics / "b.json", RECORDS))
    a = list(E.batches(records, enc, batch_size=2, seed=3, progress=False))
    b = list(E.batches(records, enc, batch_size=2, seed=3, progress=False))
    assert [x["input_ids"].shape[0] for x in a] == [2, 1]
    assert all(mx.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


# ---------------------------------------------------------------- bad input


def bad_cases(pics):
    ok = {"image": "wide.png", "conversations": RECORDS[0]["conversations"][:2]}
    (pics / "fake.png").write_text("this is not an image")
    return {
        "missing image": ([ok, {**ok, "image": "nope.png"}], 2, "image not found"),
        "not an image": ([ok, ok, {**ok, "image": "fake.png"}], 3, "not a readable image"),
        "two placeholders, one image": (
            [{**ok, "conversations": [{"from": "human", "value": "<image> <image> hi"},
                                      {"from": "gpt", "value": "x"}]}], 1, "2 <image> placeholder(s) but 1 image"),
        "placeholder, no image": (
            [ok, {"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}],
            2, "1 <image> placeholder(s) but 0 image"),
        "unanswered question": ([{"conversations": [{"from": "human", "value": "hi"}]}], 1, "alternate"),
        "no conversations": ([ok, {"image": "wide.png"}], 2, "conversations"),
    }


@pytest.mark.parametrize("case", ["missing image", "not an image", "two placeholders, one image",
                                  "placeholder, no image", "unanswered question", "no conversations"])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_bad_records_name_file_and_line(case, fmt, pics):
    records, index, message = bad_cases(pics)[case]
    if fmt == "jsonl":
        path, line = write_jsonl(pics / f"bad.{fmt}", records), index
    else:  # pretty-printed records: the error names the line the record starts on
        dumps = [json.dumps(r, indent=2) for r in records]
        path = pics / f"bad.{fmt}"
        path.write_text("[\n" + ",\n".join(dumps) + "\n]\n")
        line = 2 + sum(len(d.splitlines()) for d in dumps[:index - 1])
    with pytest.raises(SpeedQError, match=f"{re.escape(str(path))}:{line}: .*{re.escape(message)}"):
        R.load_conversations(path)


def test_malformed_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{"conversations": [}\n')
    with pytest.raises(SpeedQError, match=f"{bad}:2: malformed JSON line"):
        R.load_conversations(bad)
    arr = tmp_path / "bad.json"
    arr.write_text('[\n  {"conversations": 1},\n  {"conversations": [\n}\n]')
    with pytest.raises(SpeedQError, match=f"{arr}:4: malformed JSON"):
        R.load_conversations(arr)
    for name, text in [("empty.json", "[ ]"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SpeedQError, match=f"{tmp_path / name}: no records"):
            R.load_conversations(tmp_path / name)
    with pytest.raises(SpeedQError, match="data file not found"):
        R.load_conversations(tmp_path / "absent.json")


def test_corrupt_image_body_names_the_record(tmp_path, enc):
    good = io.BytesIO()
    Image.new("RGB", (64, 64)).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])  # valid header, truncated data
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "cut.png", "conversations": RECORDS[1]["conversations"]}])
    record = R.load_conversations(path)[0]
    with pytest.raises(SpeedQError, match=f"{path}:1: .*cut.png"):
        E.encode(record, enc)


# ---------------------------------------------------------------- order, splits


def test_seeded_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = E.split(items, 0.1, seed=7)
    assert (train, val) == E.split(items, 0.1, seed=7)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert E.split(items, 0.1, seed=8) != (train, val)
    assert E.split(items, 0.0, seed=7)[1] == []
    assert len(E.split(items[:3], 0.01, seed=0)[1]) == 1  # at least one held out
    assert E.shuffle(items, 1) == E.shuffle(items, 1) != items
    with pytest.raises(SpeedQError):
        E.split(items[:1], 0.5, seed=0)


# ---------------------------------------------------------------- teacher answers


def test_teacher_answers_are_cached_and_resumed(pics, tmp_path, enc, tok):
    files = sorted(pics.glob("[st]*.png"))  # square, tall, tiny
    calls = []

    def teacher(image, question):
        calls.append((image, question))
        return f"Answer {len(calls)} about {question.lower()}"

    cache = tmp_path / "run" / "teacher.jsonl"
    first = teacher_answers(files, None, teacher, cache, seed=0, per_image=2)
    assert len(calls) == 6 and len(first) == 6
    assert all(r.messages[0]["content"].split("\n", 1)[1] in PROMPTS for r in first)
    assert [r.images[0] for r in first][::2] == [f.resolve() for f in files]
    again = teacher_answers(files, None, teacher, cache, seed=0, per_image=2)
    assert len(calls) == 6  # nothing asked twice
    assert [r.messages for r in again] == [r.messages for r in first]

    # an interrupted run (teacher dies after one answer, last line half written) resumes
    calls.clear()
    cache2 = tmp_path / "teacher2.jsonl"

    def dying(image, question):
        if calls:
            raise KeyboardInterrupt
        return teacher(image, question)

    with pytest.raises(KeyboardInterrupt):
        teacher_answers(files, None, dying, cache2, seed=0)
    with open(cache2, "a") as f:
        f.write('{"image": "x.png", "quest')
    calls.clear()
    records = teacher_answers(files, None, teacher, cache2, seed=0)
    assert len(calls) == 2 and len(records) == 3
    assert [r.source for r in records] == [f"{cache2}:{n}" for n in (1, 3, 4)]
    s = E.encode(records[0], enc)
    assert masked_text(tok, s) == answers(records[0])[0] + "<|im_end|>"
    with pytest.raises(SpeedQError, match="image not found"):  # checked before any generation
        teacher_answers(files + [pics / "gone.png"], None, dying, tmp_path / "t3.jsonl", seed=0)


def test_teacher_generate_fn_with_mlx_vlm(tiny_ckpt, tok, image_path):
    from speedq_mlx.model.internvl import image_token_id
    from speedq_mlx.model.io import load_model
    from speedq_mlx.data.teacher_answers import mlx_generate_fn, mlx_processor

    model = load_model(tiny_ckpt, image_token_index=image_token_id(tok))
    ask = mlx_generate_fn(model, mlx_processor(tiny_ckpt), "Hermes-2", max_tokens=3)
    assert isinstance(ask(image_path, "Describe the image."), str)


# ---------------------------------------------------------------- Hugging Face datasets


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(2).random((30, 70, 3)) * 255).astype("uint8")).save(buf, format="JPEG")
    return buf.getvalue()


def test_hf_sources_share_the_conversion(tmp_path, enc, tok):
    import datasets

    jpeg = _jpeg()
    trl = datasets.Dataset.from_dict(
        {"images": [[{"bytes": jpeg, "path": None}]] * 3,
         "messages": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                    {"type": "text", "text": "\nWhat is it?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]}]] * 3},
        features=datasets.Features({
            "images": datasets.List(datasets.Image()),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
                {"type": datasets.Value("string"), "text": datasets.Value("string")})})}))
    trl.to_parquet(str(tmp_path / "trl.parquet"))
    vqa = datasets.Dataset.from_dict(
        {"image": [{"bytes": jpeg, "path": None}] * 2, "question": ["Colour?", "Shape?"],
         "answer": [["red", "crimson"], ["round"]]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.List(datasets.Value("string"))}))
    datasets.DatasetDict({"validation": vqa}).save_to_disk(str(tmp_path / "vqa"))
    cache = tmp_path / "cache"

    got = H.load_hf(f"hf:{tmp_path / 'trl.parquet'}", limit=2, cache_dir=cache)
    assert len(got) == 2 and got[0].messages[0]["content"] == "<image>\nWhat is it?"
    assert got[0].images[0].read_bytes() == jpeg  # original bytes, no re-encoding
    got = H.load_hf(f"hf:{tmp_path / 'vqa'}:validation", cache_dir=cache)
    assert [answers(r) for r in got] == [["red"], ["round"]]
    s = E.encode(got[0], enc)
    assert masked_text(tok, s) == "red<|im_end|>" and s.n_tiles[0] > 1

    folders = set(cache.iterdir())
    H.load_hf(f"hf:{tmp_path / 'vqa'}:validation", cache_dir=cache)  # reuses its copy
    assert set(cache.iterdir()) == folders

    bad = datasets.Dataset.from_dict({"caption": ["x"]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SpeedQError, match=r"row 0: unknown schema \(columns caption\)"):
        H.load_hf(f"hf:{tmp_path / 'bad'}", cache_dir=cache)
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no half-written copy


def test_default_dataset_offline_says_which_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpeedQError, match="HF_HUB_OFFLINE is set.*--data FILE.*--images DIR"):
        H.default_records(cache_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_network(*a):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(H, "_hf_rows", lambda *a: map(no_network, [0]))
    with pytest.raises(SpeedQError, match="ConnectionError: no route to host.*--data FILE.*--images DIR"):
        H.default_records(cache_dir=tmp_path)
    assert H.DEFAULT_DATASET in H.DEFAULT_DATASET_INFO and "Licence" in H.DEFAULT_DATASET_INFO


# ---------------------------------------------------------------- text for stage 3


def test_text_windows(tmp_path, tok):
    from devkit.testing import ENGLISH_TEXT

    (tmp_path / "a.txt").write_text(ENGLISH_TEXT + "\n\n" + ENGLISH_TEXT.upper() + "\n\n\n")
    docs = T.load_text(tmp_path / "a.txt")
    assert docs == [ENGLISH_TEXT, ENGLISH_TEXT.upper()]
    assert T.load_text(tmp_path) == docs
    w = T.token_windows(docs, tok, 16, seed=0)
    assert w.dtype == mx.int32 and w.shape[1] == 16 and w.shape[0] >= 4
    assert mx.array_equal(w, T.token_windows(docs, tok, 16, seed=0))
    assert T.token_windows(docs, tok, 16, n_windows=3, seed=0).shape == (3, 16)
    ids = tok(ENGLISH_TEXT, add_special_tokens=False)["input_ids"]
    flat = T.token_windows([ENGLISH_TEXT], tok, 8, seed=0).reshape(-1).tolist()
    assert flat == ids[:len(flat)] and len(ids) - len(flat) < 8  # consecutive tokens, tail dropped
    with pytest.raises(SpeedQError, match="need at least"):
        T.token_windows(["hi"], tok, 512)
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(SpeedQError, match=f"{tmp_path / 't.jsonl'}:2:"):
        T.load_text(tmp_path / "t.jsonl")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(SpeedQError, match="no text"):
        T.load_text(tmp_path / "e.txt")


def test_record_texts_drop_images(pics):
    records = R.load_conversations(write_json(pics / "r.json", RECORDS[:1]))
    (text,) = T.record_texts(records, "Hermes-2")
    assert "<image>" not in text and text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is in the picture?<|im_end|>" in text
