"""The OpenAI wire format of ``lorart serve``: request bodies parsed and checked into plain
dataclasses, and the error bodies (``{"error": {"message", "type", "param", "code"}}``) with their
HTTP status. Every check names the field and its limit; nothing here touches the model."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

# OpenAI's default for /v1/completions; chat completions default to what the context leaves.
DEFAULT_COMPLETION_TOKENS = 16
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error answered as an OpenAI-style body with ``status``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "internal_error",
        503: "service_unavailable",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass
class Sampling:
    """The generation fields both endpoints share."""

    max_tokens: int | None  # None: up to the model's max_seq_len
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False  # lorart / vLLM extension: prompt and output token ids


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    sampling: Sampling
    echo: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    sampling: Sampling
    add_generation_prompt: bool = True


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(body: dict, name: str, default: Any, low: int, high: int | None = None) -> Any:
    value = body.get(name, default)
    if value is None or value is default:
        return value
    if not _is_int(value):
        raise bad(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"must be {limit}, got {value}")
    return int(value)


def _float(body: dict, name: str, default: float, low: float, high: float, open_low=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise bad(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        lower = f"({low}" if open_low else f"[{low}"
        raise bad(name, f"must be in {lower}, {high}], got {value}")
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def _unsupported(body: dict, name: str, allowed: Any, why: str) -> None:
    value = body.get(name)
    if value is not None and value != allowed:
        raise bad(name, f"{why} (got {value!r})")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required: the served model's name or a loaded adapter's name")
    return model


def _sampling(body: dict, max_tokens_field: str, default_tokens: int | None) -> Sampling:
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad("n", f"only 1 choice per prompt is supported, got {n}")
    _unsupported(body, "best_of", 1, "only 1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, 0, "penalties are not supported; leave it 0")
    _unsupported(body, "logit_bias", {}, "logit_bias is not supported")
    _unsupported(body, "use_beam_search", False, "beam search is not supported")
    max_tokens = _int(body, max_tokens_field, None, 1)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _int(body, "max_tokens", None, 1)  # chat: the older name
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop", f"must be a string or a list of strings, got {stop!r}")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad("stop", "sequences must not be empty")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
        raise bad("stop_token_ids", f"must be a list of token ids >= 0, got {stop_ids!r}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", f"must be an object, got {options!r}")
    stream = _bool(body, "stream", False)
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise bad("seed", f"must be an integer in [0, 2^64), got {seed!r}")
    return Sampling(
        max_tokens=max_tokens if max_tokens is not None else default_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=max(0, _int(body, "top_k", 0, -1, 2**31 - 1) or 0),  # -1 (vLLM's 'off') = 0
        seed=seed,
        stop=stops,
        stop_token_ids=[int(t) for t in stop_ids],
        stream=stream,
        include_usage=bool(options and _bool(options, "include_usage", False)),
        ignore_eos=_bool(body, "ignore_eos", False),
        return_token_ids=_bool(body, "return_token_ids", False),
    )


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [[int(t) for t in prompt]]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
    ):
        prompts = [[int(t) for t in p] for p in prompt]
    else:
        raise bad(
            "prompt",
            "must be a string, a non-empty list of token ids, or a list of either "
            f"(got {type(prompt).__name__ if prompt is not None else 'nothing'})",
        )
    if any(isinstance(p, str) and not p for p in prompts):
        raise bad("prompt", "must not be empty")
    # The executor checks ids against the vocabulary; past int32 they could not reach it.
    if any(not 0 <= t < 2**31 for p in prompts if not isinstance(p, str) for t in p):
        raise bad("prompt", "token ids must be in [0, 2^31)")
    sampling = _sampling(body, "max_tokens", DEFAULT_COMPLETION_TOKENS)
    logprobs = _int(body, "logprobs", None, 0, 1)
    sampling.logprobs = logprobs is not None
    if body.get("logprobs") is not None and logprobs is None:
        raise bad("logprobs", "must be an integer")
    _unsupported(body, "suffix", None, "suffix is not supported")
    echo = _bool(body, "echo", False)
    if echo:
        raise bad("echo", "echoing the prompt is not supported")
    return CompletionRequest(model, prompts, sampling)


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(where, "must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{where}.content[{j}]", "only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}].text", "must be a string")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise bad(f"{where}.content", f"must be a string or text parts, got {content!r}")
        out.append({**m, "content": content if content is not None else ""})
    sampling = _sampling(body, "max_completion_tokens", None)
    sampling.logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, 1)
    if top and not sampling.logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    for name in ("tools", "functions", "response_format"):
        _unsupported(body, name, None, f"{name} is not supported")
    return ChatRequest(model, out, sampling, _bool(body, "add_generation_prompt", True))


def parse_load_adapter(body: Any) -> tuple[str, str]:
    body = _object(body)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name.strip():
        raise bad("lora_name", "is required: the name requests will use in 'model'")
    if not isinstance(path, str) or not path:
        raise bad("lora_path", "is required: the adapter's directory under --lora-root")
    return name, path


def parse_unload_adapter(body: Any) -> str:
    body = _object(body)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise bad("lora_name", "is required")
    return name
