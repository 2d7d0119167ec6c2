"""Self-distillation data: the full-precision teacher answers instruction prompts about
the user's images, so stages 2 and 3 can train on images that come without answers.

Answers are appended to a JSONL cache (one line per answer, flushed and synced as it
is written) beside the run; a later or resumed run asks the teacher only for what the
cache lacks. A cache belongs to one teacher model: use one per run folder.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from ..errors import SpeedQError
from ..model import internvl
from ..model.chat_template import render
from ..model.internvl import IMAGE
from .records import Record, check_image

PROMPTS = (
    "Describe the image.",
    "Describe this image in detail.",
    "What is happening in this picture?",
    "What objects can you see in the image, and where are they?",
    "What colours and shapes stand out in the image?",
    "Is there any text in the image? If so, what does it say?",
    "Write a short caption for this image.",
    "What is the main subject of the image?",
)


def _read_cache(path: Path) -> dict:
    """(image, question) -> (answer, line); a line cut short by an interrupted run is ignored."""
    done = {}
    if not path.is_file():
        return done
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
            done[(item["image"], item["question"])] = (item["answer"], n)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def _jobs(images: list[Path], prompts, seed: int, per_image: int) -> list[tuple[str, str]]:
    """(image, question) pairs; each image's questions depend only on the seed and its path,
    so adding images does not change what the others were asked."""
    if per_image > len(prompts):
        raise SpeedQError(f"{per_image} questions per image but only {len(prompts)} prompts")
    jobs = []
    for p in images:
        key = str(Path(p).resolve())
        jobs += [(key, q) for q in random.Random(f"{seed}:{key}").sample(list(prompts), per_image)]
    return jobs


def teacher_answers(images, prompts, generate_fn, cache_path, seed: int = 0,
                    per_image: int = 1) -> list[Record]:
    """One conversation per (image, question): the question asked with the image, the
    teacher's answer (`generate_fn(image_path, question) -> str`) as the reply.

    `prompts` None means the built-in PROMPTS; each image gets `per_image` of them.
    Cached answers are reused without calling the teacher; empty answers are skipped
    (and counted). Records come back in the order of `images`.
    """
    from tqdm import tqdm

    if not images:
        raise SpeedQError("no images to ask the teacher about")
    images = [check_image(Path(p), "teacher images") for p in images]  # fail before any generation
    cache_path = Path(cache_path)
    jobs = _jobs(images, prompts or PROMPTS, seed, per_image)
    done = _read_cache(cache_path)
    todo = [j for j in jobs if j not in done]
    if todo:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        n_lines = len(cache_path.read_text(encoding="utf-8").splitlines()) if cache_path.is_file() else 0
        with open(cache_path, "a", encoding="utf-8") as f:
            if f.tell() and not cache_path.read_bytes().endswith(b"\n"):
                f.write("\n")  # close a line left half-written by an interrupted run
            for image, question in tqdm(todo, desc="teacher answers", unit="answer", file=sys.stderr,
                                        initial=len(jobs) - len(todo), total=len(jobs)):
                answer = str(generate_fn(image, question)).strip()
                f.write(json.dumps({"image": image, "question": question, "answer": answer},
                                   ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                n_lines += 1
                done[(image, question)] = (answer, n_lines)
    records, empty = [], 0
    for image, question in jobs:
        answer, line = done[(image, question)]
        if not answer:
            empty += 1
            continue
        messages = [{"role": "user", "content": f"{IMAGE}\n{question}"},
                    {"role": "assistant", "content": answer}]
        records.append(Record(messages, [Path(image)], f"{cache_path}:{line}"))
    if empty:
        print(f"skipped {empty} empty teacher answer(s)", file=sys.stderr)
    if not records:
        raise SpeedQError(f"the teacher gave no answers (all empty; see {cache_path})")
    return records


def mlx_generate_fn(model, processor, template: str, max_tokens: int = 256):
    """generate_fn for teacher_answers: greedy mlx-vlm generation, prompted in the
    checkpoint's own chat template (mlx-vlm's processor expands the `<image>`).

    The model must know the tokenizer's <IMG_CONTEXT> id (model.io.load_model's
    image_token_index): mlx-vlm's default is InternVL2.5's.
    """
    from mlx_vlm import generate

    def ask(image_path, question: str) -> str:
        prompt = render(template, [{"role": "user", "content": f"{IMAGE}\n{question}"}])
        out = generate(model, processor, prompt, image=[str(image_path)], max_tokens=max_tokens,
                       temperature=0.0, verbose=False)
        return getattr(out, "text", out)

    return ask


def mlx_processor(ckpt_path, eos_token_ids=None):
    """mlx-vlm's InternVL processor for a Hugging Face checkpoint folder, with the
    detokenizer and stop criteria mlx_vlm.generate expects. (mlx_vlm.load builds the same
    through AutoConfig/AutoTokenizer, which stop to ask about the checkpoint's remote code.)"""
    from mlx_vlm.models.internvl_chat.processor import InternVLChatProcessor
    from mlx_vlm.tokenizer_utils import load_tokenizer as detokenizer_class
    from mlx_vlm.utils import StoppingCriteria

    from ..model.io import load_tokenizer, read_config
    from .images import image_processor

    config = read_config(Path(ckpt_path))
    tokenizer = load_tokenizer(Path(ckpt_path))
    processor = InternVLChatProcessor(
        image_processor=image_processor(config), tokenizer=tokenizer,
        image_size=internvl.image_size(config), patch_size=internvl.patch_size(config),
        downsample_ratio=internvl.downsample_ratio(config))
    processor.detokenizer = detokenizer_class(Path(ckpt_path), return_tokenizer=False)(tokenizer)
    if eos_token_ids is None:
        eos_token_ids = [tokenizer.convert_tokens_to_ids(internvl.END_OF_TURN)]
    tokenizer.stopping_criteria = StoppingCriteria(eos_token_ids, tokenizer)
    return processor
