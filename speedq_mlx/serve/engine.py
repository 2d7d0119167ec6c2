"""The served model on one generation thread.

Everything that touches MLX - loading, image decoding and tiling, the prompt's tensors,
generation - runs on a single worker thread that owns its stream. MLX 0.32 cannot evaluate
on one thread what another thread recorded (mlx_vlm.server's "There is no Stream(cpu, N)
in current thread": its request threads build pixel arrays that its generation thread then
evaluates), and one thread also queues concurrent requests, which one model needs anyway.

Reused from mlx-vlm: `load`, `load_image` (data: URLs, http(s), local paths), the InternVL
processor through `prepare_inputs` (dynamic tiling, each `<image>` expanded to
<img><IMG_CONTEXT>*n</img>) and `stream_generate`. Not reused: its prompt rendering
(a generic "User:/Assistant:" template for internvl_chat); the prompt comes from the
artifact's own chat template, as in `speedq-mlx chat`.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..chat import load, render_prompt
from ..model import internvl
from .protocol import APIError, ChatRequest, StopMatcher, template_messages


class Engine:
    """One artifact, served: `generate` runs on the worker thread (`submit` puts work there)."""

    def __init__(self, folder: Path, name: str | None = None, allow_local_images: bool = True,
                 max_images: int = 6, max_tokens: int = 512):
        self.folder = Path(folder)
        self.name = name or self.folder.name
        self.allow_local_images, self.max_images, self.max_tokens = allow_local_images, max_images, max_tokens
        config = json.loads((self.folder / "config.json").read_text()) if (self.folder / "config.json").is_file() else {}
        self.context = int(internvl.llm_config(config).get("max_position_embeddings", 32768))
        # mlx-vlm imported here, on the main thread: imported first on the worker, MLX state it
        # creates at import made the process abort at exit (intermittently, rc 134).
        import mlx_vlm  # noqa: F401

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedq-mlx-generate")
        self.model = self.processor = None
        try:
            self.submit(self._load).result()  # a folder that is not an artifact fails here, in one line
        except BaseException:
            self.close()
            raise

    def submit(self, fn: Callable, *args):
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        """End the generation thread (before the interpreter exits: MLX aborts otherwise)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _load(self) -> None:
        self.model, self.processor = load(self.folder)
        render_prompt(self.processor, [{"role": "user", "content": "hi"}])  # has a chat template

    def prompt(self, req: ChatRequest) -> tuple[str, list]:
        """The rendered prompt and the decoded images of a request (worker thread)."""
        from mlx_vlm.utils import load_image

        messages, sources = template_messages(req.messages, self.allow_local_images)
        if len(sources) > self.max_images:
            raise APIError(400, f"{len(sources)} images in one request; this server takes at most "
                           f"{self.max_images} (--max-images)", param="messages", code="too_many_images")
        images = []
        for k, src in enumerate(sources):
            try:
                images.append(load_image(src, timeout=10))
            except Exception as e:  # noqa: BLE001  (mlx-vlm wraps PIL's and the network's errors)
                root = e.__cause__ or e
                cause = ("no such file" if isinstance(root, FileNotFoundError)
                         else str(root).splitlines()[0].split(": ")[-1][:200])
                shown = src if len(src) < 80 else src[:60] + "..."
                raise APIError(400, f"image {k + 1} ({shown}) could not be read: {cause}",
                               param="messages", code="invalid_image") from None
        return render_prompt(self.processor, messages), images

    def inputs(self, prompt: str, images: list) -> dict:
        """Token ids, pixels and mask of the prompt, as stream_generate would prepare them."""
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        return prepare_inputs(self.processor, images=images or None, prompts=prompt,
                              image_token_index=self.model.config.image_token_index,
                              add_special_tokens=should_add_special_tokens(self.model.config.model_type,
                                                                           self.processor))

    def generate(self, req: ChatRequest, cancel: threading.Event, emit: Callable) -> None:
        """Answer one request (worker thread): emit("prompt", str), emit("text", str)...,
        then emit("done", {"finish_reason", "usage"})."""
        from mlx_vlm import stream_generate

        prompt, images = self.prompt(req)
        emit("prompt", prompt)
        inputs = self.inputs(prompt, images)
        n_prompt = int(inputs["input_ids"].shape[1])
        if n_prompt >= self.context:
            raise APIError(400, f"the prompt is {n_prompt} tokens (images included); this model's "
                           f"context is {self.context} tokens", param="messages",
                           code="context_length_exceeded")
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        kw = {"max_tokens": min(req.token_limit(self.max_tokens), self.context - n_prompt),
              "temperature": 0.0 if req.temperature is None else req.temperature, **extra}
        if req.top_p is not None:
            kw["top_p"] = req.top_p
        if req.seed is not None:
            kw["seed"] = req.seed
        stops, finish, generated = StopMatcher(req.stops()), "length", 0
        gen = stream_generate(self.model, self.processor, prompt, input_ids=inputs["input_ids"],
                              pixel_values=inputs.get("pixel_values"), mask=inputs.get("attention_mask"), **kw)
        try:
            for r in gen:
                generated = r.generation_tokens
                piece, hit = stops.feed(r.text)
                if piece:
                    emit("text", piece)
                if hit or cancel.is_set():
                    finish = "stop"
                    break
                if r.finish_reason:
                    finish = r.finish_reason
        finally:
            gen.close()
        tail = stops.flush()
        if tail:
            emit("text", tail)
        emit("done", {"finish_reason": finish, "usage": {"prompt_tokens": n_prompt,
                      "completion_tokens": generated, "total_tokens": n_prompt + generated}})
