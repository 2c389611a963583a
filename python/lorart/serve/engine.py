"""The server's side of the executor: one :class:`Generation` per prompt, fed to asyncio.

Each generation is a streaming executor request enqueued to the executor's shared queue: one
dispatcher thread reads it (``Executor.await_any``, the GIL released while it waits) and hands
each step's responses to their generations on the event loop in one wake-up, however many
requests are in flight. A generation decodes its tokens to text as they come (whole characters
only), checks for stop strings (text that could still become one is held back) and ends early
by cancelling its request. A generation whose caller leaves (a closed connection, an exception)
cancels and releases its request, so the executor forgets it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from lorart._core import InferenceRequest, SamplingConfig
from lorart.llm import LLM
from lorart.serve.adapters import Adapter, AdapterRegistry
from lorart.serve.metrics import Metrics
from lorart.serve.protocol import ApiError, Sampling

logger = logging.getLogger("lorart")

# How long one dispatcher wait blocks before it checks whether the server is stopping.
_WAIT_SECONDS = 0.25

FINISH_REASONS = {"length": "length", "end_id": "stop", "stop": "stop", "cancelled": "abort"}


@dataclass
class Chunk:
    """What one step of a generation adds."""

    text: str
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str | None = None  # set on the last chunk


@dataclass
class Generation:
    engine: Engine
    model: str  # the served name or the adapter's name (the metrics label)
    prompt_ids: list[int]
    sampling: Sampling
    tokenizer: Tokenizer  # its adapter's own, else the server's: detokenizes its output
    request_id: int = -1
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    text: str = ""  # decoded output so far (cut at a stop string once one is found)
    sent: int = 0  # characters of `text` handed out
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    finish_reason: str | None = None
    _open: bool = True
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # filled by the dispatcher

    async def next(self) -> Chunk:
        """The next piece (waits for it); the last one has ``finish_reason`` set. ApiError when
        the request failed before anything was handed out."""
        responses = [await self.queue.get()]
        while not self.queue.empty():
            responses.append(self.queue.get_nowait())
        new_ids: list[int] = []
        new_logprobs: list[float] = []
        final = None
        for r in responses:
            if r.error is not None:
                self.close("error")
                status = 400 if r.error_kind == "invalid_request" else 500
                raise ApiError(status, r.error)
            new_ids.extend(r.output_token_ids)
            if r.log_probs is not None:
                new_logprobs.extend(float(v) for v in r.log_probs)
            if r.is_final:
                final = r
        if new_ids and self.first_token is None:
            self.first_token = time.monotonic() - self.started
        self.token_ids.extend(new_ids)
        self.log_probs.extend(new_logprobs)
        text, stopped = self._decode(final is not None)
        piece = text[self.sent :]
        self.sent = len(text)
        if stopped:
            self.close("stop")  # the model may still be generating past the stop string
        elif final is not None:
            self._open = False  # taking the final response ended it in the executor
            self.close(FINISH_REASONS.get(final.finish_reason, "stop"))
        return Chunk(piece, new_ids, new_logprobs, self.finish_reason)

    def _decode(self, final: bool) -> tuple[str, bool]:
        """The text that may be handed out now, and whether a stop string ended it. Until the
        end, a trailing partial character and the last len(longest stop) - 1 characters (which
        could still become a stop string) are held back."""
        full = self.tokenizer.decode(self.token_ids)
        if not final:
            full = full.rstrip("\ufffd")  # a character whose bytes are still coming
        stops = self.sampling.stop
        hits = [p for p in (full.find(s) for s in stops) if p >= 0]
        if hits:
            self.text = full[: min(hits)]
            return self.text, True
        self.text = full
        if stops and not final:
            hold = max(len(s) for s in stops) - 1
            return full[: max(self.sent, len(full) - hold)], False
        return full, False

    def close(self, reason: str = "abort") -> None:
        """Ends the generation with `reason` unless it has ended: stops its request if that
        still runs and tells the executor nobody will read it."""
        if self._open:
            self._open = False
            self.engine.executor.cancel_request(self.request_id)
            self.engine.executor.release_request(self.request_id)
        self.engine.dispatcher.forget(self.request_id)
        if self.finish_reason is None:
            self.finish_reason = reason
            self.engine.finished(self)


class Dispatcher:
    """One thread that reads the executor's shared queue and hands the responses to their
    generations' queues on the event loop (one loop wake-up per batch of responses)."""

    def __init__(self, executor: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._executor, self.loop = executor, loop
        self._queues: dict[int, asyncio.Queue] = {}  # request id -> queue; loop thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorart-dispatch", daemon=True)
        self._thread.start()

    def add(self, request_id: int, queue: asyncio.Queue) -> None:
        self._queues[request_id] = queue

    def forget(self, request_id: int) -> None:
        self._queues.pop(request_id, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                responses = self._executor.await_any(timeout=_WAIT_SECONDS)
            except Exception:
                if not self._stop.is_set():
                    logger.exception("lorart serve: the response dispatcher stopped")
                return
            if responses:
                try:
                    self.loop.call_soon_threadsafe(self._deliver, responses)
                except RuntimeError:  # the loop closed
                    return

    def _deliver(self, responses: list) -> None:
        for r in responses:
            queue = self._queues.get(r.request_id)
            if queue is not None:  # else a generation that was closed: dropped
                queue.put_nowait(r)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2 * _WAIT_SECONDS + 1)


class Engine:
    """The executor, tokenizer and adapters behind the HTTP routes."""

    def __init__(
        self,
        llm: LLM,
        served_model_name: str,
        adapters: AdapterRegistry,
        max_queue: int,
        chat_template: object | None = None,
    ) -> None:
        self.llm = llm
        self.executor = llm.executor
        self.served_model_name = served_model_name
        self.adapters = adapters
        self.max_queue = max_queue
        self.chat_template = chat_template
        self.max_seq_len = self.executor.config.max_seq_len
        self.metrics = Metrics(self.executor.stats, lambda: len(adapters))
        self._dispatcher: Dispatcher | None = None  # started by the first request, on its loop
        self._lock = threading.Lock()
        self._active = 0

    def adapter_for(self, model: str) -> Adapter | None:
        """None for the base model; ApiError 404 for a name the server does not serve."""
        if model == self.served_model_name:
            return None
        adapter = self.adapters.get(model)
        if adapter is None:
            known = [self.served_model_name, *self.adapters.names()]
            raise ApiError(
                404,
                f"model {model!r} does not exist: this server serves {known}",
                param="model",
                code="model_not_found",
            )
        return adapter

    def tokenizer_for(self, adapter: Adapter | None) -> Tokenizer:
        """The adapter's own tokenizer, else the server's (the base model's / --tokenizer-dir's)."""
        if adapter is not None and adapter.tokenizer is not None:
            return adapter.tokenizer
        return self.llm.tokenizer

    def template_for(self, adapter: Adapter | None) -> object | None:
        """The adapter's own chat template, else the server's (None: there is none)."""
        if adapter is not None and adapter.chat_template is not None:
            return adapter.chat_template
        return self.chat_template

    def encode(
        self,
        prompt: str | list[int],
        add_special_tokens: bool = True,
        adapter: Adapter | None = None,
    ) -> list[int]:
        """Token ids of ``prompt``: text tokenized with ``adapter``'s tokenizer."""
        if isinstance(prompt, str):
            tokenizer = self.tokenizer_for(adapter)
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        return list(prompt)

    def start(
        self, model: str, adapter: Adapter | None, prompt_ids: list[int], sampling: Sampling
    ) -> Generation:
        """Queues one prompt. ApiError 400 for what the model cannot take, 429 when the server
        already holds --max-queue requests."""
        if not prompt_ids:
            raise ApiError(400, "prompt: it tokenizes to no tokens", param="prompt")
        room = self.max_seq_len - len(prompt_ids)
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
        if room < 1 or max_tokens > room:
            field_name = "max_tokens" if sampling.max_tokens is not None else "prompt"
            raise ApiError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's max_seq_len {self.max_seq_len}",
                param=field_name,
            )
        vocab = self.executor.model_config.vocab_size if adapter is None else adapter.vocab_size
        for t in sampling.stop_token_ids:
            if t >= vocab:
                raise ApiError(400, f"stop_token_ids: {t} is past the vocabulary ({vocab})")
        greedy = sampling.temperature == 0.0
        request = InferenceRequest(
            prompt_ids,
            max_new_tokens=max_tokens,
            sampling_config=SamplingConfig(
                top_k=1 if greedy else min(sampling.top_k, vocab),
                top_p=sampling.top_p,
                temperature=1.0 if greedy else sampling.temperature,
                seed=sampling.seed,
            ),
            end_id=None if sampling.ignore_eos else self.llm.eos_token_id,
            stop_token_ids=[[t] for t in sampling.stop_token_ids],
            streaming=True,
            return_log_probs=sampling.logprobs,
        )
        if adapter is not None:
            request.lora_task_id = adapter.task_id
            request.lora_weights = adapter.weights
            request.lora_config = adapter.config
        with self._lock:  # only once nothing but the enqueue can fail
            if self._active >= self.max_queue:
                raise ApiError(
                    429,
                    f"the server holds its maximum of {self.max_queue} requests (--max-queue); "
                    "retry later",
                    code="queue_full",
                )
            self._active += 1
        generation = Generation(self, model, prompt_ids, sampling, self.tokenizer_for(adapter))
        try:
            generation.request_id = self.executor.enqueue_shared(request)
        except BaseException:
            self._release_slot()
            raise
        # Before any response can be delivered: delivery runs on this (the loop's) thread.
        self.dispatcher.add(generation.request_id, generation.queue)
        return generation

    def start_dispatcher(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the thread that feeds the generations, on the server's event loop."""
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.executor, loop)

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:  # an app run without its lifespan
            self.start_dispatcher(asyncio.get_running_loop())
        return self._dispatcher

    def finished(self, g: Generation) -> None:
        self._release_slot()
        self.metrics.finished(
            g.model,
            g.finish_reason or "abort",
            len(g.prompt_ids),
            len(g.token_ids),
            g.first_token,
            time.monotonic() - g.started,
        )

    def _release_slot(self) -> None:
        with self._lock:
            self._active -= 1

    async def run_blocking(self, fn: Callable[..., object], *args: object) -> object:
        """``fn(*args)`` on a worker thread (adapter conversion, tokenization of long prompts)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self._dispatcher is not None:
            self._dispatcher.stop()


async def until_disconnected(is_disconnected: Callable[[], Awaitable[bool]]) -> None:
    while not await is_disconnected():
        await asyncio.sleep(0.1)
