"""``lorart serve``: an OpenAI-compatible multi-LoRA server (FastAPI on uvicorn).

:func:`build` loads the model and the ``--lora-modules`` adapters and returns the app (for tests
and embedding); :func:`serve` runs it until SIGINT / SIGTERM, then lets in-flight requests finish
for up to ``drain_timeout`` seconds and cancels the rest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI

from lorart.llm import LLM
from lorart.serve.adapters import AdapterRegistry
from lorart.serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from lorart.serve.chat import ChatTemplate
from lorart.serve.engine import Engine
from lorart.serve.protocol import ApiError

__all__ = ["build", "parse_lora_modules", "serve"]

logger = logging.getLogger("lorart")


def parse_lora_modules(items: Sequence[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` pairs; ValueError naming the malformed one."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules: expected NAME=PATH, got {item!r}")
        out.append((name, Path(path)))
    return out


def build(
    model_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    lora_modules: Sequence[tuple[str, Path]] = (),
    lora_root: str | Path | None = None,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **llm_kwargs: object,
) -> tuple[FastAPI, Engine]:
    """The app and its engine: the model loaded, ``lora_modules`` converted and validated
    (ValueError naming the adapter that does not fit), the chat template read."""
    if max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
    if lora_root is not None and not Path(lora_root).is_dir():
        raise FileNotFoundError(f"--lora-root {lora_root}: not a directory")
    name = served_model_name or Path(model_dir).resolve().name
    template = ChatTemplate.from_dir(tokenizer_dir or model_dir)
    llm = LLM(model_dir, tokenizer_dir, **llm_kwargs)
    try:
        registry = AdapterRegistry(
            llm.executor.model_config, llm.executor.config.max_lora_rank, lora_root, llm.tokenizer
        )
        for adapter_name, path in lora_modules:
            if not path.is_dir():
                raise FileNotFoundError(f"--lora-modules {adapter_name}={path}: not a directory")
            try:
                registry.add(adapter_name, path.resolve(), name)
            except ApiError as err:
                raise ValueError(f"--lora-modules {adapter_name}={path}: {err.message}") from None
        engine = Engine(llm, name, registry, max_queue, template)
    except BaseException:
        llm.shutdown()
        raise
    return create_app(engine, api_key, max_body_bytes), engine


def serve(
    host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, **build_kwargs
) -> None:
    import uvicorn

    app, engine = build(**build_kwargs)
    logger.info(
        "serving %r with %d adapter(s) on http://%s:%d",
        engine.served_model_name,
        len(engine.adapters),
        host,
        port,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()  # also when uvicorn never started (e.g. the port is taken)
