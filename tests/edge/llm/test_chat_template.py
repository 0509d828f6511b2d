"""Chat templates: the checkpoint's (string, named list, .jinja file), the default, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldline.edge.llm.chat_template import (
    DEFAULT_STOP,
    ChatMessage,
    ChatTemplateError,
    load_chat_template,
)

MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "why?")]


def write_cfg(d: Path, **cfg: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", **cfg}))
    return d


def test_default_is_chatml_and_stops_at_end_of_turn(tmp_path: Path) -> None:
    t = load_chat_template(write_cfg(tmp_path))
    assert t.is_default and t.stop == DEFAULT_STOP
    assert t.render(MESSAGES) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_checkpoint_templates_string_named_list_and_jinja_file(tmp_path: Path) -> None:
    src = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
    a = load_chat_template(write_cfg(tmp_path / "a", chat_template=src))
    assert not a.is_default and a.stop == ()
    assert a.render(MESSAGES) == "<s>system:be brief;user:why?;"
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": src}]
    b = load_chat_template(write_cfg(tmp_path / "b", chat_template=named))
    assert b.render(MESSAGES) == a.render(MESSAGES)
    c_dir = write_cfg(tmp_path / "c")
    (c_dir / "chat_template.jinja").write_text(src)
    assert load_chat_template(c_dir).render(MESSAGES) == a.render(MESSAGES)


def test_template_errors(tmp_path: Path) -> None:
    broken = load_chat_template(write_cfg(tmp_path / "a", chat_template="{% for %}"))
    assert broken.is_default  # logged and replaced, the node keeps serving
    strict = load_chat_template(
        write_cfg(
            tmp_path / "b",
            chat_template="{% if messages[0]['role'] != 'user' %}"
            "{{ raise_exception('first message must be from the user') }}{% endif %}ok",
        )
    )
    with pytest.raises(ChatTemplateError, match="first message"):
        strict.render(MESSAGES)
    assert strict.render(MESSAGES[1:]) == "ok"
    # the sandbox refuses reaching into Python internals
    evil = load_chat_template(
        write_cfg(tmp_path / "c", chat_template="{{ messages.__class__.__mro__ }}")
    )
    with pytest.raises(ChatTemplateError):
        evil.render(MESSAGES)
