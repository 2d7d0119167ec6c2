"""speedq-mlx serve, started for real on a loopback port and talked to with the `openai`
client: answers, streaming, the rendered prompt, OpenAI-style errors, concurrent clients."""

import socket
import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devkit.ports import free_port
from speedq_mlx.model.chat_template import render
from speedq_mlx.model.registry import ASSETS

openai = pytest.importorskip("openai")
BUNDLE = ASSETS / "tiny-shapes"
ITEMS = [json.loads(line) for line in (BUNDLE / "vqa_test.jsonl").read_text().splitlines()[:40]]


def _image(item) -> Path:
    return BUNDLE / item["image"]


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(item, url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or str(_image(item))}},
                                         {"type": "text", "text": item["question"]}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, model id, server log) for a W4 RTN artifact of the bundled tiny-shapes model."""
    work = tmp_path_factory.mktemp("serve")
    art = work / "ts-w4"
    subprocess.run([sys.executable, "-m", "speedq_mlx", "quantize", "-m", "tiny-shapes", "--method", "rtn",
                    "-b", "4", "-o", str(art)], check=True, capture_output=True, timeout=300)
    port, log = free_port(), work / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "speedq_mlx", "serve", str(art), "--port", str(port),
                                 "--max-tokens", "16"], stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        for _ in range(240):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited: {log.read_text()[-2000:]}")
                time.sleep(0.25)
        yield client, "ts-w4", log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _correct(answer: str, item) -> bool:
    return answer.strip().lower().rstrip(".") == item["answer"]


def test_models_and_health(server):
    client, name, _ = server
    assert [m.id for m in client.models.list().data] == [name]
    import urllib.request

    with urllib.request.urlopen(str(client.base_url).replace("/v1/", "/health")) as r:
        assert json.loads(r.read()) == {"status": "ok", "model": name}


def test_answers_correctly_in_both_modes(server):
    client, name, _ = server
    right = 0
    for item in ITEMS[:10]:
        r = client.chat.completions.create(model=name, messages=_ask(item), max_tokens=8)
        right += _correct(r.choices[0].message.content, item)
    assert right >= 8  # the model scores 0.87 on the bundled test set
    item = ITEMS[0]
    full = client.chat.completions.create(model=name, messages=_ask(item, _data_url(_image(item))), max_tokens=8)
    assert _correct(full.choices[0].message.content, item) and full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens > 16 and full.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=name, messages=_ask(item), max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one piece
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_prompt_is_the_chatml_one_chat_builds(server):
    """The server renders with the artifact's own template: the prompt `speedq-mlx chat` builds
    (chat.render_prompt), equal to InternVL's Hermes-2 ChatML rendered independently."""
    client, name, _ = server
    item = ITEMS[1]
    history = [*_ask(item), {"role": "assistant", "content": "green"},
               {"role": "user", "content": "And the shape in the bottom left?"}]
    r = client.chat.completions.create(model=name, messages=history, max_tokens=4, extra_body={"echo_prompt": True})
    turns = [{"role": "user", "content": f"<image>\n{item['question']}"}, {"role": "assistant", "content": "green"},
             {"role": "user", "content": "And the shape in the bottom left?"}]
    from transformers import AutoTokenizer

    from speedq_mlx.chat import render_prompt

    tok = AutoTokenizer.from_pretrained(str(_artifact(server)))
    assert r.model_extra["prompt"] == render_prompt(tok, turns) == render("Hermes-2", turns)
    r = client.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"echo_prompt": True})
    assert r.model_extra["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def _artifact(server) -> Path:
    log = server[2]
    return log.parent / "ts-w4"


def test_stop_strings_cut_the_answer(server):
    client, name, _ = server
    r = client.chat.completions.create(model=name, messages=_ask(ITEMS[0]), max_tokens=8, stop=["square"])
    assert r.choices[0].message.content == "red " and r.choices[0].finish_reason == "stop"


BAD = {
    "unknown model": (dict(model="gpt-4o"), openai.NotFoundError, "model_not_found"),
    "malformed message": (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, None),
    "user message without content": (dict(messages=[{"role": "user"}]), openai.BadRequestError, None),
    "no messages": (dict(messages=[]), openai.BadRequestError, None),
    "image that does not decode": (dict(messages=_ask(ITEMS[0], "data:image/png;base64," + base64.b64encode(b"not a png").decode())),
                                   openai.BadRequestError, "invalid_image"),
    "missing image file": (dict(messages=_ask(ITEMS[0], "/no/such/image.png")), openai.BadRequestError, "invalid_image",
                           "/no/such/image.png) could not be read: no such file"),
    "too many images": (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(_image(ITEMS[0]))}}] * 7
                                        + [{"type": "text", "text": "Count."}]}]), openai.BadRequestError, "too_many_images"),
    "prompt over the context": (dict(messages=[{"role": "user", "content": "red square " * 400}]),
                                openai.BadRequestError, "context_length_exceeded"),
    "image in an assistant turn": (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                                  {"role": "user", "content": "hi"}]), openai.BadRequestError, None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, case):
    client, name, _ = server
    kwargs, error, code, *says = BAD[case]
    request = {"model": name, "messages": _ask(ITEMS[0]), "max_tokens": 4, **kwargs}
    for stream in (False, True):
        with pytest.raises(error) as e:
            client.chat.completions.create(**request, stream=stream)
        assert 400 <= e.value.status_code < 500
        assert e.value.body["message"] and (code is None or e.value.code == code), e.value.body
        assert all(text in e.value.body["message"] for text in says), e.value.body
    good = client.chat.completions.create(model=name, messages=_ask(ITEMS[0]), max_tokens=8)
    assert _correct(good.choices[0].message.content, ITEMS[0])


def test_two_concurrent_clients_are_both_answered(server):
    client, name, _ = server
    answers = {}

    def ask(i):
        r = client.chat.completions.create(model=name, messages=_ask(ITEMS[i]), max_tokens=8)
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == [0, 2] and _correct(answers[0], ITEMS[0])
    alone = client.chat.completions.create(model=name, messages=_ask(ITEMS[2]), max_tokens=8)
    assert answers[2] == alone.choices[0].message.content  # queued, not mixed


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    res = subprocess.run([sys.executable, "-m", "speedq_mlx", "serve", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a model folder" in res.stderr


def test_a_port_in_use_is_refused_but_one_a_stopped_server_left_in_time_wait_is_not():
    from speedq_mlx.errors import SpeedQError
    from speedq_mlx.serve.app import check_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(SpeedQError, match=f"cannot listen on 127.0.0.1:{port}"):
        check_port("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end stays in TIME_WAIT
    listener.close()
    client.close()
    check_port("127.0.0.1", port)
