"""HTTP routes of `speedq-mlx serve` (FastAPI, run by uvicorn; both come with mlx-vlm):
/v1/chat/completions (JSON or server-sent events), /v1/models, /health."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import SpeedQError
from .engine import Engine
from .protocol import APIError, ChatRequest


def error_response(err: APIError) -> JSONResponse:
    # the openai client retries 5xx twice by default; a failed generation here is
    # deterministic, so say not to
    return JSONResponse(err.body(), status_code=err.status, headers={"x-should-retry": "false"})


def _start(engine: Engine, req: ChatRequest):
    """Queue the request on the generation thread; (event queue, cancel flag)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(kind, payload):
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    def work():
        try:
            engine.generate(req, cancel, emit)
        except APIError as e:
            emit("error", e)
        except Exception as e:  # noqa: BLE001  (any generation failure reaches the client)
            emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))

    engine.submit(work)
    return queue, cancel


async def _next(queue: asyncio.Queue, prompt: list) -> tuple:
    """The next text / done / error event (a "prompt" event is kept in `prompt`)."""
    while True:
        kind, payload = await queue.get()
        if kind != "prompt":
            return kind, payload
        prompt.append(payload)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="speedq-mlx serve")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or None
        return error_response(APIError(400, f"{loc}: {e.get('msg', 'invalid request')}", param=loc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "speedq-mlx"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.model != engine.name:
            raise APIError(404, f"model {req.model!r} is not served here (this server serves "
                           f"{engine.name!r}; see /v1/models)", param="model", code="model_not_found")
        queue, cancel = _start(engine, req)
        cid, created, prompt = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), []
        first = await _next(queue, prompt)
        if first[0] == "error":  # a bad request fails before any 200, streaming or not
            raise first[1]
        if not req.stream:
            return await _complete(req, queue, first, cid, created, prompt)
        return StreamingResponse(_events(req, queue, cancel, first, cid, created),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _complete(req: ChatRequest, queue, event, cid: str, created: int, prompt: list) -> dict:
    text = []
    while event[0] == "text":
        text.append(event[1])
        event = await _next(queue, prompt)
    if event[0] == "error":
        raise event[1]
    body = {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "finish_reason": event[1]["finish_reason"], "logprobs": None,
                         "message": {"role": "assistant", "content": "".join(text)}}],
            "usage": event[1]["usage"]}
    if req.echo_prompt:
        body["prompt"] = prompt[0]
    return body


async def _events(req: ChatRequest, queue, cancel, event, cid: str, created: int):
    def chunk(delta, finish=None, usage=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                      "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while event[0] == "text":
            yield chunk({"content": event[1]})
            event = await _next(queue, [])
        if event[0] == "error":
            yield f"data: {json.dumps(event[1].body())}\n\n"
            return
        yield chunk({}, finish=event[1]["finish_reason"])
        if (req.stream_options or {}).get("include_usage"):
            yield chunk(None, usage=event[1]["usage"])
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # finished, or the client went away: stop generating


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the port is taken; SO_REUSEADDR as uvicorn binds, so
    a port a stopped server left in TIME_WAIT is free to reuse."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SpeedQError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def serve(engine: Engine, host: str, port: int, log=print) -> None:
    """Run the server until interrupted."""
    import uvicorn

    check_port(host, port)
    log(f"serving {engine.folder} as model {engine.name!r} at http://{host}:{port}/v1 "
        "(OpenAI-compatible; Ctrl-C stops)")
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
    finally:
        engine.close()
