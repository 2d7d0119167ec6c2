"""The artifact chats in InternVL2's own template (ChatML, Hermes-2 system prompt)."""

import pytest

from speedq_mlx import chat
from speedq_mlx.model.chat_template import HERMES_2_SYSTEM, jinja_template, render

from devkit.testing import run_cli


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory):
    from speedq_mlx.pipeline import QuantizeArgs, quantize

    out = tmp_path_factory.mktemp("chat") / "art"
    return quantize(QuantizeArgs(method="rtn", model=str(tiny_ckpt), output=out, bits=4), log=lambda *a: None)


def test_artifact_template_renders_hermes2_by_hand(artifact):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(artifact))
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Sure?"}]
    expected = ("<|im_start|>system\n" + HERMES_2_SYSTEM + "<|im_end|>"
                "<|im_start|>user\n<image>\nWhat is it?<|im_end|>"
                "<|im_start|>assistant\nA cat.<|im_end|>"
                "<|im_start|>user\nSure?<|im_end|>"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    assert render("Hermes-2", msgs) == expected
    assert (artifact / "chat_template.jinja").read_text() == jinja_template("Hermes-2")


def test_chat_is_multi_turn_and_streams(artifact, image_path, monkeypatch):
    prompts = []
    original = chat.render_prompt
    monkeypatch.setattr(chat, "render_prompt", lambda p, m: prompts.append(original(p, m)) or prompts[-1])
    lines = iter(["What is in the picture?", "And the colour?"])
    written = []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    chat.chat_loop(artifact, str(image_path), None, None, max_tokens=4, temperature=0.0,
                   read=read, write=lambda *a, **k: written.append("".join(a)))
    assert len(prompts) == 2
    assert prompts[0].count("<image>") == 1 and prompts[1].count("<image>") == 1
    assert prompts[1].startswith(prompts[0])  # the second turn carries the first
    assert prompts[1].endswith("<|im_start|>user\nAnd the colour?<|im_end|><|im_start|>assistant\n")
    assert sum(len(w) for w in written) > 0


def test_chat_cli_one_shot_and_errors(artifact, image_path, capsys, tmp_path):
    code, out, err = run_cli(["chat", artifact, "--image", image_path, "-p", "Hi", "--max-tokens", "4"], capsys)
    assert code == 0, err
    assert out.strip()
    code, _, err = run_cli(["chat", artifact, "--image", tmp_path / "none.png", "-p", "Hi"], capsys)
    assert code == 2 and err.startswith("error: image not found")
    code, _, err = run_cli(["chat", tmp_path, "-p", "Hi"], capsys)
    assert code == 2 and "not a model folder" in err
