"""InternVL's own conversation templates, as Jinja chat templates.

mlx-vlm renders internvl_chat prompts with a generic "User: ... Assistant:" template;
InternVL models were trained on ChatML with a fixed system prompt (InternVL's
`conversation.py`, MPT separator style). The artifact carries the real template in
its tokenizer so that `speedq-mlx chat` (and any tokenizer-level user) talks to the
model in the format it was trained on.
"""

from __future__ import annotations

from .internvl import END_OF_TURN

HERMES_2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
    "联合开发的多模态大语言模型。"
)

# template name in config.json -> (default system message, separator after each turn)
TEMPLATES = {
    "Hermes-2": (HERMES_2_SYSTEM, END_OF_TURN),
    "internlm2-chat": (HERMES_2_SYSTEM, END_OF_TURN),
    "internvl2_5": (INTERNVL2_5_SYSTEM, END_OF_TURN + "\n"),
}


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def jinja_template(name: str) -> str:
    """The Jinja chat template equivalent to InternVL's conversation template `name`.

    Messages are {"role": "system"|"user"|"assistant", "content": str}; images are
    `<image>` placeholders inside the content, expanded later by the processor.
    """
    if name not in TEMPLATES:
        raise KeyError(f"unknown InternVL template {name!r} (known: {', '.join(TEMPLATES)})")
    system, sep = TEMPLATES[name]
    s, e = _escape(system), _escape(sep)
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = '{s}' -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        f"{{{{- '<|im_start|>system\\n' + system + '{e}' -}}}}"
        "{%- for m in turns -%}"
        f"{{{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '{e}' -}}}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def render(name: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Python rendering of the same template (InternVL's MPT style), for checks and tests."""
    system, sep = TEMPLATES[name]
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = "<|im_start|>system\n" + system + sep
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}{sep}"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out
