"""Chat templates: ``chat_template`` from a model's ``tokenizer_config.json`` (or a
``chat_template.jinja`` beside it), rendered with jinja2 in a sandbox as transformers'
``apply_chat_template`` does (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorart.serve.protocol import ApiError


class TemplateError(Exception):
    pass


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False)
        self._template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The directory's template, or None when it has none (ValueError for a broken one)."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValueError(f"{config_path}: not JSON ({err})") from None
            if not isinstance(config, dict):
                raise ValueError(
                    f"{config_path}: expected a JSON object, got {type(config).__name__}"
                )
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if not isinstance(source, str) or not source:
            return None
        try:
            return cls(
                source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
            )
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"{model_dir}: chat_template does not parse ({err})") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as err:
            raise ApiError(
                400, f"messages: the chat template refused them: {err}", "messages"
            ) from None
        except jinja2.TemplateError as err:
            raise ApiError(
                400, f"messages: rendering the chat template failed: {err}", "messages"
            ) from None
