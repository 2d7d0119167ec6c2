"""Chat with an artifact in the model's own template (ChatML), streaming, multi-turn.

Built on mlx-vlm's loader and stream_generate; only the prompt rendering differs
from `mlx_vlm.chat`, which uses a generic "User:/Assistant:" template for InternVL.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SpeedQError, one_line


def render_prompt(processor, messages: list[dict]) -> str:
    """The conversation in the artifact's chat template (from its tokenizer files)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not getattr(tokenizer, "chat_template", None):
        raise SpeedQError("the model folder carries no chat template (not a speedq-mlx artifact?)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load(folder: Path):
    from mlx_vlm import load as vlm_load

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SpeedQError(f"{folder} is not a model folder (no config.json)")
    try:
        return vlm_load(str(folder))
    except Exception as e:  # noqa: BLE001  (what mlx-vlm raises on a folder it cannot load)
        raise SpeedQError(f"cannot load {folder} with mlx-vlm: {one_line(e)}") from None


def reply(model, processor, messages, image=None, max_tokens=256, temperature=0.0, on_text=None):
    """Generate the assistant's next turn; `on_text` receives streamed pieces."""
    from mlx_vlm import stream_generate

    prompt = render_prompt(processor, messages)
    pieces = []
    for chunk in stream_generate(model, processor, prompt, image=image,
                                 max_tokens=max_tokens, temperature=temperature):
        pieces.append(chunk.text)
        if on_text:
            on_text(chunk.text)
    return "".join(pieces).strip()


def chat_loop(folder: Path, image: str | None, prompt: str | None, system: str | None,
              max_tokens: int, temperature: float, read=input, write=print) -> None:
    """One turn with `prompt`, else an interactive loop until EOF / 'exit'."""
    if image is not None and not Path(image).is_file():
        raise SpeedQError(f"image not found: {image}")
    model, processor = load(folder)
    messages = [{"role": "system", "content": system}] if system else []
    first = True
    while True:
        if prompt is not None:
            text = prompt
        else:
            try:
                text = read(">> ")
            except EOFError:
                return
            if text.strip() in ("exit", "quit"):
                return
        content = f"<image>\n{text}" if (image and first) else text
        messages.append({"role": "user", "content": content})
        answer = reply(model, processor, messages, image=[image] if image else None,
                       max_tokens=max_tokens, temperature=temperature,
                       on_text=lambda t: write(t, end="", flush=True))
        write("")
        messages.append({"role": "assistant", "content": answer})
        first = False
        if prompt is not None:
            return
