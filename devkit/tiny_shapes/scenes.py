"""The tiny-shapes task: rendered scenes and short-answer questions about them.

A scene is a 2x2 grid of cells; 1-4 cells hold a coloured shape (circle, square,
triangle; red, green, blue, yellow) and, in some scenes, one cell holds a short word.
Every question has a one- or two-word answer: counts, colours, shapes, positions,
yes/no and the word. A scene is a pure function of (seed, index), so the training
stream, the fixed test split (its own seed) and the bundled files are reproducible.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 225), "yellow": (230, 190, 20)}
WORDS = ("cat", "dog", "sun", "car", "hat", "cup", "pen", "map")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
TRAIN_SEED, TEST_SEED = 1, 2  # disjoint scene streams
IMAGE_SIZE = 96


@dataclass
class Scene:
    objects: dict  # cell -> (colour, shape)
    word: tuple | None  # (cell, word) or None
    background: tuple
    jitter: list  # per cell (dx, dy, size)


def scene(seed: int, index: int) -> Scene:
    rng = random.Random(f"{seed}:{index}")
    cells = list(CELLS)
    rng.shuffle(cells)
    with_word = rng.random() < 0.3
    n = rng.randint(1, 3 if with_word else 4)
    objects = {c: (rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in cells[:n]}
    word = (cells[n], rng.choice(WORDS)) if with_word else None
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    jitter = [(rng.randint(-5, 5), rng.randint(-5, 5), rng.randint(26, 36)) for _ in CELLS]
    return Scene(objects, word, bg, jitter)


def render(s: Scene, size: int = IMAGE_SIZE):
    """The scene as a size x size RGB PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (size, size), s.background)
    draw = ImageDraw.Draw(im)
    half = size // 2
    for i, cell in enumerate(CELLS):
        dx, dy, d = s.jitter[i]
        cx = (i % 2) * half + half // 2 + dx * size // 96
        cy = (i // 2) * half + half // 2 + dy * size // 96
        r = d * size // 96 // 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if cell in s.objects:
            colour, shape = s.objects[cell]
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif s.word and s.word[0] == cell:
            font = ImageFont.load_default(size=18 * size // 96)
            draw.text((cx, cy), s.word[1], fill=(10, 10, 10), font=font, anchor="mm")
    return im


def questions(s: Scene) -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) the scene supports."""
    objs = list(s.objects.items())
    out = [("count", "How many shapes are there?", NUMBER_WORDS[len(objs)])]
    for colour in COLOURS:
        k = sum(c == colour for _, (c, _) in objs)
        out.append(("count_colour", f"How many {colour} shapes are there?", NUMBER_WORDS[k]))
    for shape in SHAPES:
        match = [c for _, (c, sh) in objs if sh == shape]
        if len(match) == 1:
            out.append(("colour_of", f"What colour is the {shape}?", match[0]))
    for colour in COLOURS:
        match = [sh for _, (c, sh) in objs if c == colour]
        if len(match) == 1:
            out.append(("shape_of", f"What shape is the {colour} one?", match[0]))
    pairs = [(c, sh) for _, (c, sh) in objs]
    for cell, (c, sh) in objs:
        if pairs.count((c, sh)) == 1:
            out.append(("where", f"Where is the {c} {sh}?", cell))
    for cell in CELLS:
        if cell in s.objects:
            out.append(("colour_at", f"What colour is the shape in the {cell}?", s.objects[cell][0]))
        what = " ".join(s.objects[cell]) if cell in s.objects else (
            s.word[1] if s.word and s.word[0] == cell else "nothing")
        out.append(("what_at", f"What is in the {cell}?", what))
    for c in COLOURS:
        for sh in SHAPES:
            out.append(("exists", f"Is there a {c} {sh}?", "yes" if (c, sh) in pairs else "no"))
    if s.word:
        out.append(("word", "What word is written?", s.word[1]))
    return out


def sample_question(s: Scene, rng: random.Random, exclude=()) -> tuple[str, str, str]:
    """One question: a uniform kind, then a uniform question of that kind (yes/no balanced);
    questions in `exclude` are not asked again."""
    qs = [q for q in questions(s) if q[1] not in exclude]
    kinds = sorted({k for k, _, _ in qs})
    kind = rng.choice(kinds)
    pool = [q for q in qs if q[0] == kind]
    if kind == "exists":
        want = rng.choice(["yes", "no"])
        pool = [q for q in pool if q[2] == want] or pool
    return rng.choice(pool)


def corpus_lines() -> list[str]:
    """Every question and answer string the task can produce (for the tokenizer)."""
    lines = ["How many shapes are there?", "What word is written?", *NUMBER_WORDS, *WORDS, *CELLS,
             "yes", "no"]
    for c in COLOURS:
        lines += [c, f"How many {c} shapes are there?", f"What shape is the {c} one?"]
        for sh in SHAPES:
            lines += [f"Is there a {c} {sh}?", f"Where is the {c} {sh}?"]
    for sh in SHAPES:
        lines += [sh, f"What colour is the {sh}?"]
    lines += [f"What colour is the shape in the {cell}?" for cell in CELLS]
    lines += [f"What is in the {cell}?" for cell in CELLS] + ["nothing"]
    lines += [f"{c} {sh}" for c in COLOURS for sh in SHAPES]
    return lines


def write_split(folder: Path, seed: int, n_scenes: int, per_scene: int, name: str) -> list[dict]:
    """Render n_scenes into folder/images/<name>/ and return per_scene QA items for each
    (image path relative to folder)."""
    img_dir = folder / "images" / name
    img_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_scenes):
        s = scene(seed, i)
        rel = f"images/{name}/{name}-{i:04d}.png"
        render(s).save(folder / rel, optimize=True)
        rng = random.Random(f"q:{seed}:{i}")
        seen = set()
        for _ in range(per_scene * 4):
            kind, q, a = sample_question(s, rng)
            if q not in seen:
                seen.add(q)
                items.append({"image": rel, "question": q, "answer": a, "kind": kind})
            if len(seen) == per_scene:
                break
    return items


def write_bundle(folder: Path, n_train: int = 256, n_test: int = 200) -> None:
    """The files shipped with tiny-shapes: training conversations (scenes of the training
    stream) and the VQA test file (scenes of the test stream), with their images."""
    folder = Path(folder)
    train = write_split(folder, TRAIN_SEED, n_train, 4, "train")
    test = write_split(folder, TEST_SEED, n_test, 2, "test")
    with open(folder / "conversations.jsonl", "w") as f:
        for it in train:
            f.write(json.dumps({"image": it["image"], "conversations": [
                {"from": "human", "value": "<image>\n" + it["question"]},
                {"from": "gpt", "value": it["answer"]}]}) + "\n")
    with open(folder / "vqa_test.jsonl", "w") as f:
        for it in test:
            f.write(json.dumps(it) + "\n")
