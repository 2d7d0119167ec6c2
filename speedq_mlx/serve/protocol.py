"""The OpenAI chat-completions protocol as the server speaks it: request schema, OpenAI-style
errors, messages -> template messages with `<image>` placeholders, and stop strings."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..model.internvl import IMAGE


class APIError(Exception):
    """An error the client sees as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions this server reads; others are accepted and
    ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    echo_prompt: bool = False  # not OpenAI: return the rendered prompt (debugging, tests)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def _image_source(part: dict, where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: an image_url part needs image_url.url", param=where)
    return url[len("file://"):] if url.startswith("file://") else url


def template_messages(messages: list[Message], allow_local: bool) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> ({role, content} with `<image>` placeholders where the images were,
    the image sources in order: data: URLs, http(s) URLs, local paths when allowed)."""
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}].content"
        role = "system" if m.role == "developer" else m.role
        if m.content is None and role != "assistant":
            raise APIError(400, f"{where}: a {m.role} message needs content", param=where)
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        text = []
        for part in m.content:
            kind = part.get("type")
            if kind in ("text", "input_text"):
                text.append(str(part.get("text") or ""))
            elif kind in ("image_url", "input_image"):
                if role != "user":
                    raise APIError(400, f"{where}: images are accepted in user messages only", param=where)
                url = _image_source(part, where)
                if not url.startswith(("data:", "http://", "https://")) and not allow_local:
                    raise APIError(400, f"{where}: local image paths are off on this server "
                                   "(send a data: or http(s) URL)", param=where, code="invalid_image_url")
                images.append(url)
                text.append(f"{IMAGE}\n")
            else:
                raise APIError(400, f"{where}: unsupported content part type {kind!r}", param=where)
        out.append({"role": role, "content": "".join(text)})
    if any(m["role"] == "system" for m in out[1:]):
        raise APIError(400, "messages: a system message may only come first", param="messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be the user's", param="messages")
    return out, images


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = len(self.buf) - self.hold
        if cut <= 0:
            return "", False
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
