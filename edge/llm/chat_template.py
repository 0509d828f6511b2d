"""Chat messages to prompt text: the checkpoint's Jinja chat template, or a documented default.

The template comes from tokenizer_config.json ("chat_template", a string or a list of named
templates) or chat_template.jinja; without one the gateway uses ChatML (DEFAULT_TEMPLATE) and
stops generation at its end-of-turn marker. Templates run in Jinja's sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = structlog.get_logger(__name__)

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_STOP = ("<|im_end|>",)


class ChatTemplateError(ValueError):
    """Messages the template refuses (it raised), or a template that does not compile."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Renders messages the way the checkpoint was trained to read them."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", default: bool):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.is_default = default
        # The default template's end-of-turn marker is text the tokenizer may not know as a
        # special token; stop on it as a string.
        self.stop = DEFAULT_STOP if default else ()

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        try:
            return str(
                self._template.render(
                    messages=[{"role": m.role, "content": m.content} for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def load_chat_template(model_dir: Path) -> ChatTemplate:
    """The checkpoint's template, else the default; a broken one is logged and replaced."""
    cfg: dict[str, Any] = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as exc:
            log.warning("tokenizer_config.json does not parse", error=str(exc))
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    jinja_file = model_dir / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.is_file():
        source = jinja_file.read_text()
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    if isinstance(source, str) and source.strip():
        try:
            return ChatTemplate(source, bos_token=bos, eos_token=eos, default=False)
        except ChatTemplateError as exc:
            log.warning(
                "the checkpoint's chat template is unusable; using the default", error=str(exc)
            )
    return ChatTemplate(DEFAULT_TEMPLATE, bos_token=bos, eos_token=eos, default=True)
