"""A checkpoint's own chat template (jinja2 in a sandbox, rendered as Hugging Face renders it) and the checks of
the messages a client sends; errors name `messages[i].<field>`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

MAX_MESSAGES = 1024


def _special_token(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_text(model_dir: Path) -> tuple[str | None, dict]:
    config_path = model_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"model: {config_path} is not valid JSON: {e}") from None
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), config
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default")
    return (template if isinstance(template, str) and template else None), config


def validate_messages(messages: Any, field: str = "messages") -> list[dict[str, str]]:
    """A non-empty list of {role, content} with non-empty string roles and string contents."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{field}: must be a non-empty list of {{role, content}} messages")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"{field}: {len(messages)} messages exceed the limit of {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{field}[{i}]: must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{field}[{i}].role: must be a non-empty string")
        if not isinstance(content, str):
            raise ValueError(f"{field}[{i}].content: must be a string")
        out.append({"role": role, "content": content})
    return out


def is_messages(prompt) -> bool:
    """Whether a prompt is a chat (a list of message objects) rather than text or token ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


@dataclass
class ChatTemplate:
    source: str
    bos_token: str | None
    eos_token: str | None

    def __post_init__(self):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                      ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"model: the chat template does not compile: {e}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint directory (`chat_template.jinja`, else `tokenizer_config.json`), or None."""
        text, config = _template_text(Path(model_dir))
        if text is None:
            return None
        return cls(text, _special_token(config.get("bos_token")), _special_token(config.get("eos_token")))

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        messages = validate_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:  # the template refused these messages (e.g. roles out of order)
            raise ValueError(f"messages: the model's chat template refused them: {e}") from None
