"""Records -> `Sample`s (token ids, pixel tiles, loss mask) -> padded batches.

Prompts are built exactly as InternVL was trained: the checkpoint's own chat template
(config.json "template", e.g. Hermes-2 ChatML with its system prompt) and every `<image>`
expanded to `<img>` + `<IMG_CONTEXT>` * (tokens per tile * tiles of that image) + `</img>`,
as mlx-vlm's InternVLChatProcessor does. The loss mask is 1 on the assistant's answer
tokens and the `<|im_end|>` that closes each answer, 0 elsewhere (the losses shift it by
one themselves).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import mlx.core as mx

from ..errors import SpeedQError
from ..model import internvl
from ..model.chat_template import TEMPLATES, render
from ..model.internvl import END_OF_TURN, IMAGE, IMG_CONTEXT, IMG_END, IMG_START
from . import images as img
from .records import Record

DROP_WARNING = 0.03  # above this share of dropped samples the message is a warning


@dataclass
class Sample:
    """One encoded conversation, ready for collate()."""

    input_ids: list[int]
    loss_mask: list[int]
    pixel_values: mx.array | None  # [n_tiles_total, 3, S, S] or None
    n_tiles: list[int]  # per image, in order
    source: str = ""


@dataclass
class Encoder:
    """What encoding needs from the checkpoint: tokenizer, image tiler, template, token counts."""

    tokenizer: object
    processor: object
    template: str
    num_image_token: int
    image_token_id: int


def encoder(config: dict, tokenizer, max_tiles: int | None = None) -> Encoder:
    """Everything encode() needs, from the checkpoint's config.json and tokenizer.

    `max_tiles` caps dynamic tiling (the checkpoint's max_dynamic_patch otherwise; 12 for
    InternVL2) - fewer tiles, fewer image tokens and less memory per sample.
    """
    template = internvl.template(config)
    if template not in TEMPLATES:
        raise SpeedQError(f"unknown InternVL chat template {template!r} in config.json "
                          f"(known: {', '.join(TEMPLATES)})")
    processor = img.image_processor(config)
    if max_tiles is not None:
        processor.dynamic_max_num = max_tiles
    return Encoder(tokenizer, processor, template, internvl.tokens_per_tile(config),
                   internvl.image_token_id(tokenizer))


def expand_images(messages: list[dict], n_tiles: list[int], num_image_token: int) -> list[dict]:
    """Each `<image>` in order -> <img><IMG_CONTEXT>*(num_image_token*tiles)</img>."""
    it = iter(n_tiles)
    out = []
    for m in messages:
        pieces = m["content"].split(IMAGE)
        text = pieces[0]
        for p in pieces[1:]:
            text += IMG_START + IMG_CONTEXT * (num_image_token * next(it)) + IMG_END + p
        out.append({**m, "content": text})
    return out


def render_training_text(messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation in the template, and the character spans of each answer
    including its closing `<|im_end|>` (the part the loss is computed on)."""
    text = render(template, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(template, messages[:i], add_generation_prompt=True))
            end = start + len(m["content"]) + len(END_OF_TURN)
            if text[start:end] != m["content"] + END_OF_TURN:
                raise AssertionError(f"template {template!r} does not place answers as expected")
            spans.append((start, end))
    return text, spans


def tokenize_with_mask(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a 0/1 mask of the tokens that overlap a character span."""
    tok = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(tok["input_ids"]), tok["offset_mapping"]
    return ids, [int(any(s < e_ and e > s_ for s_, e_ in spans)) for s, e in offsets]


def encode(record: Record, enc: Encoder, max_length: int | None = None) -> Sample | None:
    """Token ids, pixel tiles and loss mask of one record.

    Longer than `max_length`: cut at max_length when every image token is inside;
    otherwise (an image would be cut) None - the caller skips and counts it. Also None
    when no answer token is left after the cut. A token that straddles the start of an
    answer (a BPE merge of the template's newline with an answer that starts with
    whitespace) counts as an answer token: it predicts answer characters.
    """
    pixels = []
    for path in record.images:
        try:
            pixels.append(img.tiles(enc.processor, path))
        except SpeedQError as e:
            raise SpeedQError(f"{record.source}: {e}") from None
    n_tiles = [p.shape[0] for p in pixels]
    messages = expand_images(record.messages, n_tiles, enc.num_image_token)
    text, spans = render_training_text(messages, enc.template)
    ids, mask = tokenize_with_mask(text, spans, enc.tokenizer)
    n_img = ids.count(enc.image_token_id)
    if n_img != enc.num_image_token * sum(n_tiles):
        raise SpeedQError(f"{record.source}: the text already contains {IMG_CONTEXT} tokens")
    if max_length is not None and len(ids) > max_length:
        if n_img and max(i for i, t in enumerate(ids) if t == enc.image_token_id) + 1 >= max_length:
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    pv = mx.concatenate(pixels, axis=0) if pixels else None
    return Sample(ids, mask, pv, n_tiles, record.source)


def iter_samples(records: list[Record], enc: Encoder, max_length: int | None = None,
                 progress: bool = True):
    """encode() each record lazily (pixel tiles are large: a 13-tile InternVL2 image is
    ~31 MB in fp32), skipping - and at the end counting - those that do not fit."""
    from tqdm import tqdm

    skipped = 0
    for r in tqdm(records, desc="encoding", unit="sample", disable=not progress or len(records) < 50,
                  file=sys.stderr):
        s = encode(r, enc, max_length)
        if s is None:
            skipped += 1
        else:
            yield s
    if skipped:
        share = skipped / len(records)
        loud = "warning: dropped" if share > DROP_WARNING else "skipped"
        print(f"{loud} {skipped} of {len(records)} samples ({share:.0%}): image tokens or every "
              f"answer token beyond max_length={max_length}"
              + (" (raise --max-length or lower --max-tiles to keep them)" if share > DROP_WARNING else ""),
              file=sys.stderr)


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-padded batch: input_ids / attention_mask / loss_mask [B, L] and the tiles of
    every sample concatenated in batch order (the row-major order of the <IMG_CONTEXT>
    tokens in input_ids, so features scatter onto `input_ids == image_token_id`)."""
    L = max(len(s.input_ids) for s in samples)
    pad = [L - len(s.input_ids) for s in samples]
    ids = [s.input_ids + [pad_id] * p for s, p in zip(samples, pad)]
    att = [[1] * len(s.input_ids) + [0] * p for s, p in zip(samples, pad)]
    loss = [s.loss_mask + [0] * p for s, p in zip(samples, pad)]
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    return {
        "input_ids": mx.array(ids, dtype=mx.int32),
        "attention_mask": mx.array(att, dtype=mx.int32),
        "loss_mask": mx.array(loss, dtype=mx.int32),
        "pixel_values": mx.concatenate(pix, axis=0) if pix else None,
        "n_tiles": [s.n_tiles for s in samples],
    }


def batches(records: list[Record], enc: Encoder, batch_size: int, max_length: int | None = None,
            seed: int = 0, progress: bool = True):
    """Collated batches of the records in a seeded order (the last one may be smaller)."""
    pad = internvl.pad_token_id(enc.tokenizer)
    buf = []
    for s in iter_samples(shuffle(records, seed), enc, max_length, progress):
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf, pad)
            buf = []
    if buf:
        yield collate(buf, pad)


# ---------------------------------------------------------------- order and splits


def shuffle(records: list, seed: int) -> list:
    """A seeded permutation (a new list; the same seed gives the same order everywhere)."""
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def split(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): disjoint, seeded; validation gets round(n * fraction) records,
    at least one when the fraction is positive, and train keeps at least one."""
    if not 0 <= val_fraction < 1:
        raise SpeedQError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise SpeedQError(f"{n} record(s) cannot be split into training and validation")
    order = shuffle(records, seed)
    return order[n_val:], order[:n_val]
