"""The HTTP routes of ``lorart serve`` (FastAPI on uvicorn), in OpenAI's wire format so the
official ``openai`` client works unchanged: completions and chat completions (streamed as
server-sent events ending with ``data: [DONE]``), models, runtime adapter load / unload, health
and Prometheus metrics. Every failure is an OpenAI-style error body with its status; one bad
request never disturbs the others."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorart.serve.engine import Chunk, Engine, Generation, until_disconnected
from lorart.serve.metrics import CONTENT_TYPE
from lorart.serve.protocol import (
    ApiError,
    Sampling,
    parse_chat,
    parse_completion,
    parse_load_adapter,
    parse_unload_adapter,
)

DEFAULT_MAX_BODY_BYTES = 4 << 20


class _ApiKey:
    """Requires ``Authorization: Bearer KEY`` on every /v1 route (401 otherwise)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                err = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Stream(StreamingResponse):
    """A server-sent event stream that ends its generations however it ends: done, failed, or
    cancelled by a client that went away."""

    def __init__(self, body: AsyncIterator[bytes], generations: list[Generation]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._generations = generations

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for g in self._generations:
                g.close()


def create_app(
    engine: Engine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start_dispatcher(asyncio.get_running_loop())
        yield
        engine.shutdown()  # requests still running end cancelled

    app = FastAPI(
        title="lorart", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {err}").body(), status_code=500)

    if api_key is not None:
        # A plain ASGI middleware: Starlette's @app.middleware wrapper would hide client
        # disconnects from the routes (request.is_disconnected() never turns true under it).
        app.add_middleware(_ApiKey, api_key=api_key)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"the request body is over {max_body_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes")
        try:
            return json.loads(body)
        except ValueError as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "lorart",
                "root": root,
                "parent": parent,
                "max_model_len": engine.max_seq_len,
            }

        data = [card(engine.served_model_name, engine.served_model_name, None)]
        for name in engine.adapters.names():
            adapter = engine.adapters.get(name)
            if adapter is not None:
                data.append(card(name, str(adapter.path), engine.served_model_name))
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> JSONResponse:
        name, path = parse_load_adapter(await read_json(request))
        real = engine.adapters.resolve_runtime_path(path)
        await engine.run_blocking(engine.adapters.add, name, real, engine.served_model_name)
        return JSONResponse({"status": "ok", "lora_name": name, "lora_path": str(real)})

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> JSONResponse:
        name = parse_unload_adapter(await read_json(request))
        engine.adapters.remove(name)
        engine.metrics.forget(name)
        return JSONResponse({"status": "ok", "lora_name": name})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion(await read_json(request))
        adapter = engine.adapter_for(req.model)
        prompts = [await engine.run_blocking(engine.encode, p, True, adapter) for p in req.prompts]
        generations = start_all(req.model, adapter, prompts, req.sampling)
        first = await first_chunks(generations, request)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.sampling.stream:
            return sse(completion_events(generations, first, meta, req.sampling), generations)
        chunks = await run_to_end(generations, first, request)
        choices = []
        for i, (g, cs) in enumerate(zip(generations, chunks, strict=True)):
            choice = {
                "index": i,
                "text": "".join(c.text for c in cs),
                "logprobs": completion_logprobs(g, cs) if req.sampling.logprobs else None,
                "finish_reason": g.finish_reason,
            }
            if req.sampling.return_token_ids:
                choice["prompt_token_ids"] = g.prompt_ids
                choice["token_ids"] = g.token_ids
            choices.append(choice)
        return JSONResponse(
            {**meta, "object": "text_completion", "choices": choices, "usage": usage(generations)}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(await read_json(request))
        adapter = engine.adapter_for(req.model)
        template = engine.template_for(adapter)
        if template is None:
            raise ApiError(
                400,
                f"model {req.model!r} has no chat template (no chat_template in "
                "its tokenizer_config.json): use /v1/completions",
                param="messages",
            )
        text = template.render(req.messages, req.add_generation_prompt)
        ids = await engine.run_blocking(engine.encode, text, False, adapter)
        generations = start_all(req.model, adapter, [ids], req.sampling)
        first = await first_chunks(generations, request)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.sampling.stream:
            return sse(chat_events(generations[0], first[0], meta, req.sampling), generations)
        [chunks] = await run_to_end(generations, first, request)
        g = generations[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
            "logprobs": chat_logprobs(g, chunks) if req.sampling.logprobs else None,
            "finish_reason": g.finish_reason,
        }
        return JSONResponse(
            {**meta, "object": "chat.completion", "choices": [choice], "usage": usage([g])}
        )

    # ------------------------------------------------------------------ helpers

    def start_all(
        model: str, adapter: Any, prompts: list[list[int]], sampling: Sampling
    ) -> list[Generation]:
        started: list[Generation] = []
        try:
            for ids in prompts:
                started.append(engine.start(model, adapter, ids, sampling))
        except BaseException:
            for g in started:
                g.close()
            raise
        return started

    async def first_chunks(generations: list[Generation], request: Request) -> list[Chunk]:
        """Each generation's first piece, so that a request the executor refuses gets its status
        before any byte of a stream is sent."""
        return await guarded(asyncio.gather(*(g.next() for g in generations)), generations, request)

    async def run_to_end(
        generations: list[Generation], first: list[Chunk], request: Request
    ) -> list[list[Chunk]]:
        async def rest(g: Generation, chunk: Chunk) -> list[Chunk]:
            out = [chunk]
            while out[-1].finish_reason is None:
                out.append(await g.next())
            return out

        work = asyncio.gather(*(rest(g, c) for g, c in zip(generations, first, strict=True)))
        return await guarded(work, generations, request)

    async def guarded(work: Any, generations: list[Generation], request: Request) -> Any:
        """Awaits `work`; a client that disconnects meanwhile cancels its requests."""
        work = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(until_disconnected(request.is_disconnected))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                raise ApiError(499, "the client closed the connection")
            return work.result()
        except BaseException:
            work.cancel()  # a failed generation's siblings must not wait on
            for g in generations:
                g.close()
            raise
        finally:
            watch.cancel()

    def sse(events: AsyncIterator[dict[str, Any]], generations: list[Generation]) -> _Stream:
        async def body() -> AsyncIterator[bytes]:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return _Stream(body(), generations)

    async def merged(
        generations: list[Generation], first: list[Chunk]
    ) -> AsyncIterator[tuple[int, Chunk]]:
        """(index, chunk) of every generation as they come; closes them all if left early."""
        queue: asyncio.Queue[tuple[int, Chunk | BaseException]] = asyncio.Queue()

        async def pump(i: int, g: Generation, chunk: Chunk) -> None:
            try:
                await queue.put((i, chunk))
                while chunk.finish_reason is None:
                    chunk = await g.next()
                    await queue.put((i, chunk))
            except BaseException as err:
                await queue.put((i, err))

        tasks = [
            asyncio.ensure_future(pump(i, g, c))
            for i, (g, c) in enumerate(zip(generations, first, strict=True))
        ]
        left = len(generations)
        try:
            while left:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    left -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for g in generations:
                g.close()

    async def completion_events(
        generations: list[Generation], first: list[Chunk], meta: dict, sampling: Sampling
    ) -> AsyncIterator[dict[str, Any]]:
        base = {**meta, "object": "text_completion"}
        # Tokens whose text is not out yet (a partial character, text held back for a stop
        # string) go with the next chunk that carries text, and offsets run on across chunks.
        pending: dict[int, list[Chunk]] = {i: [] for i in range(len(generations))}
        offsets = dict.fromkeys(range(len(generations)), 0)
        try:
            async for i, chunk in merged(generations, first):
                pending[i].append(chunk)
                ids_only = sampling.return_token_ids and chunk.token_ids
                if not chunk.text and not ids_only and chunk.finish_reason is None:
                    continue
                carried, pending[i] = pending[i], []
                logprobs = None
                if sampling.logprobs:
                    logprobs = completion_logprobs(generations[i], carried, offsets[i])
                    offsets[i] += sum(len(t) for t in logprobs["tokens"])
                choice = {
                    "index": i,
                    "text": chunk.text,
                    "logprobs": logprobs,
                    "finish_reason": chunk.finish_reason,
                }
                if sampling.return_token_ids:
                    choice["token_ids"] = [t for c in carried for t in c.token_ids]
                yield {**base, "choices": [choice]}
        except ApiError as err:
            yield err.body()
            return
        if sampling.include_usage:
            yield {**base, "choices": [], "usage": usage(generations)}

    async def chat_events(
        g: Generation, first: Chunk, meta: dict, sampling: Sampling
    ) -> AsyncIterator[dict[str, Any]]:
        base = {**meta, "object": "chat.completion.chunk"}
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**base, "choices": [{**role, "logprobs": None}]}
        pending: list[Chunk] = []
        try:
            async for _, chunk in merged([g], [first]):
                pending.append(chunk)
                if not chunk.text and chunk.finish_reason is None:
                    continue
                carried, pending = pending, []
                choice = {
                    "index": 0,
                    "delta": {"content": chunk.text} if chunk.text else {},
                    "logprobs": chat_logprobs(g, carried) if sampling.logprobs else None,
                    "finish_reason": chunk.finish_reason,
                }
                yield {**base, "choices": [choice]}
        except ApiError as err:
            yield err.body()
            return
        if sampling.include_usage:
            yield {**base, "choices": [], "usage": usage([g])}

    def token_texts(g: Generation, ids: list[int]) -> list[str]:
        return [g.tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    def completion_logprobs(g: Generation, chunks: list[Chunk], at: int = 0) -> dict[str, Any]:
        ids = [t for c in chunks for t in c.token_ids]
        values = [v for c in chunks for v in c.log_probs]
        texts = token_texts(g, ids)
        offsets = []
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": texts,
            "token_logprobs": values,
            "top_logprobs": [{t: v} for t, v in zip(texts, values, strict=False)],
            "text_offset": offsets,
        }

    def chat_logprobs(g: Generation, chunks: list[Chunk]) -> dict[str, Any]:
        ids = [t for c in chunks for t in c.token_ids]
        values = [v for c in chunks for v in c.log_probs]
        content = [
            {"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
            for t, v in zip(token_texts(g, ids), values, strict=False)
        ]
        return {"content": content}

    def usage(generations: list[Generation]) -> dict[str, int]:
        prompt = sum(len(g.prompt_ids) for g in generations)
        completion = sum(len(g.token_ids) for g in generations)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    return app
