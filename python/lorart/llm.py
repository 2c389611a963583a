"""``lorart.LLM``: text in, text out. A tokenizer (``tokenizer.json`` through the ``tokenizers``
library) in front of an :class:`lorart.Executor`, with LoRA adapters named by path.

Adapters (PEFT directories or TensorRT-LLM ``.npy`` directories) get task ids automatically and
are converted once; a request sends the weights only when the executor's LoRA cache does not
hold its task.

Waits poll the executor with short timeouts, so Ctrl-C (``KeyboardInterrupt``) is raised within
a fraction of a second; the requests still in flight are then cancelled and the exception goes
on to the caller.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lorart import hf, lora
from lorart._core import (
    ExecutorConfig,
    InferenceRequest,
    LoraConfig,
    LoraWeights,
    ModelConfig,
    Response,
    SamplingConfig,
)
from lorart.executor import Executor
from lorart.model import progress_bar

logger = logging.getLogger(__name__)

# How long one wait blocks before Python gets to run its signal handlers.
_POLL_SECONDS = 0.05

# A prompt: text, or token ids that go to the model as they are.
Prompt = str | Sequence[int]


@dataclass
class GenerationOutput:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "end_id", "stop", "cancelled"
    prompt_token_ids: list[int] = field(default_factory=list)  # what the model was given
    # Seconds from the start of the call to this prompt's first generated token (its prefill
    # done); None when no token was generated.
    first_token_seconds: float | None = None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read ``tokenizer.json`` (``path`` is the file or its directory).

    Raises ``FileNotFoundError`` when there is none and ``ValueError`` when the tokenizers
    library cannot parse it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for bad files
        raise ValueError(
            f"{path}: not a tokenizer.json the tokenizers library can read ({err})"
        ) from None


def check_vocab(tokenizer: Tokenizer, model_config: ModelConfig, where: str = "") -> None:
    """Warn when the tokenizer knows fewer ids than the model can generate: ids past the
    tokenizer's vocabulary decode to nothing."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size < model_config.vocab_size:
        logger.warning(
            "%sthe tokenizer has %d ids but the model's vocabulary has %d: generated ids >= %d "
            "decode to nothing (is the tokenizer the model's?)",
            where,
            size,
            model_config.vocab_size,
            size,
        )


class LLM:
    """Generate text with one base model and any number of LoRA adapters.

    ``num_threads``: CPU threads of the forward (None: the CPUs available to this process).
    ``dtype``: how the weights are stored: ``"auto"`` (the checkpoint's dtype), ``"float32"``,
    ``"float16"``, ``"bfloat16"``. ``precision``: ``"float32"`` (exact: a bf16 checkpoint gives
    the tokens of its float32 copy) or ``"bfloat16"`` (bf16 dot products, faster).
    ``config`` takes :class:`lorart.ExecutorConfig`'s other fields (``max_batch_size``,
    ``max_num_tokens``, ``max_seq_len``, ``max_lora_rank``, ``lora_cache``, ``kv_cache``).
    ``lora_dirs`` are converted and validated against the model's ``config.json`` before the
    checkpoint loads, so a bad adapter fails in seconds; other adapters are converted on first
    use. Use it as a context manager (or call :meth:`shutdown`) to stop the executor's thread.
    """

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
        lora_dirs: Sequence[str | Path] = (),
        dtype: str = "auto",
        precision: str = "float32",
        **config: object,
    ) -> None:
        model_config = hf.load_config(model_dir)
        tokenizer_path = tokenizer_dir if tokenizer_dir is not None else model_dir
        self.tokenizer = load_tokenizer(tokenizer_path)
        check_vocab(self.tokenizer, model_config, where=f"{tokenizer_path}: ")
        executor_config = ExecutorConfig(
            device=device, num_threads=num_threads, dtype=dtype, precision=precision, **config
        )
        self._adapters: dict[Path, tuple[int, LoraWeights, LoraConfig]] = {}
        self._lock = threading.Lock()
        self._max_lora_rank = executor_config.max_lora_rank
        if lora_dirs:
            self._convert_all(lora_dirs, model_config)
        self.executor = Executor(model_dir, executor_config)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.executor.model_config.eos_token_ids
        return eos[0] if eos else None

    def _convert_all(self, lora_dirs: Sequence[str | Path], model_config: ModelConfig) -> None:
        paths = [Path(d) for d in lora_dirs]
        total = sum(f.stat().st_size for p in paths if p.is_dir() for f in p.iterdir())
        start = time.monotonic()
        with progress_bar(len(paths), "converting adapters", "adapter", total) as bar:
            for path in paths:
                self._adapter(path, model_config)
                bar.update(1)
        logger.info("converted %d adapter(s) in %.2f s", len(paths), time.monotonic() - start)

    def _adapter(
        self, adapter_dir: str | Path, model_config: ModelConfig | None = None
    ) -> tuple[int, LoraWeights, LoraConfig]:
        path = Path(adapter_dir).resolve()
        model_config = model_config if model_config is not None else self.executor.model_config
        with self._lock:
            if path not in self._adapters:
                weights, config = lora.load_dir(path, model_config)
                try:
                    lora.validate(weights, config, model_config, self._max_lora_rank)
                except ValueError as err:
                    raise type(err)(f"adapter {path}: {err}") from None
                self._adapters[path] = (len(self._adapters), weights, config)
            return self._adapters[path]

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt`` (text is tokenized; token ids are returned as they are)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        ids = list(prompt) if isinstance(prompt, Sequence | np.ndarray) else None
        if ids is not None and all(isinstance(t, numbers.Integral) for t in ids):
            return [int(t) for t in ids]
        raise TypeError(
            f"a prompt is a str or a list of token ids; got {type(prompt).__name__} "
            "(several tokenized prompts: a list of lists)"
        )

    def _request(
        self,
        ids: list[int],
        adapter: str | Path | None,
        max_new_tokens: int,
        sampling: SamplingConfig,
    ) -> InferenceRequest:
        request = InferenceRequest(
            ids,
            max_new_tokens=max_new_tokens,
            sampling_config=sampling,
            end_id=self.eos_token_id,
            streaming=True,  # every step's tokens, so first-token times are seen
        )
        if adapter is not None:
            task_id, weights, config = self._adapter(adapter)
            request.lora_task_id = task_id
            # Always attached: the cache matches identical weights without copying them again,
            # and an idle task may be evicted between any check here and the enqueue.
            request.lora_weights = weights
            request.lora_config = config
        return request

    def _drive(self, requests: list[InferenceRequest]) -> Iterator[tuple[int, Response]]:
        """Enqueue ``requests``; yield ``(index, response)`` as responses arrive. Requests not
        finished when this stops (an exception, Ctrl-C, the caller closing it) are cancelled
        and released (the executor frees them at their end without anyone reading them)."""
        pending: dict[int, int] = {}  # index -> request id, in prompt order
        try:
            for i, request in enumerate(requests):
                pending[i] = self.executor.enqueue_request(request)
            while pending:
                # Block briefly on the earliest unfinished prompt, then take what the others have.
                focus = next(iter(pending))
                for i, request_id in list(pending.items()):
                    wait = _POLL_SECONDS if i == focus else 0.0
                    for response in self.executor.await_responses(request_id, timeout=wait):
                        if response.is_final:
                            del pending[i]
                        yield i, response
        finally:
            for request_id in pending.values():
                self.executor.cancel_request(request_id)
                self.executor.release_request(request_id)

    def generate_iter(
        self,
        prompts: Prompt | Sequence[Prompt],
        lora: Sequence[str | Path | None] | str | Path | None = None,
        max_new_tokens: int = 32,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = True,
    ) -> Iterator[tuple[int, list[int], Response]]:
        """Run every prompt (all in flight together) and yield ``(prompt index, new token ids,
        response)`` as tokens arrive, each prompt's in order. Raises ``ValueError`` with the
        executor's message when a request fails; closing the iterator cancels the rest."""
        prompts = _as_prompt_list(prompts)
        adapters = _per_prompt(lora, len(prompts))
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
        requests = [
            self._request(self.encode(p, add_special_tokens), a, max_new_tokens, sampling)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        responses = self._drive(requests)
        try:
            for i, response in responses:
                if response.error is not None:
                    raise ValueError(f"prompt {i}: {response.error}")
                yield i, list(response.output_token_ids), response
        finally:
            responses.close()  # cancels the rest now, not whenever the generator is collected

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        lora: Sequence[str | Path | None] | str | Path | None = None,
        max_new_tokens: int = 32,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[GenerationOutput]:
        """Run every prompt (all in flight together); ``lora[i]`` is prompt ``i``'s adapter
        directory or ``None`` for the base model. A prompt is text or a list of token ids.
        Greedy by default (``top_k=1``). Raises ``ValueError`` with the executor's message when
        a request fails; on ``KeyboardInterrupt`` cancels the requests and re-raises."""
        prompts = _as_prompt_list(prompts)
        start = time.monotonic()
        outputs = [
            GenerationOutput("", [], "", self.encode(p, add_special_tokens)) for p in prompts
        ]
        stream = self.generate_iter(
            [out.prompt_token_ids for out in outputs],
            lora,
            max_new_tokens,
            top_k,
            top_p,
            temperature,
            seed,
        )
        try:
            for i, tokens, response in stream:
                out = outputs[i]
                if tokens and out.first_token_seconds is None:
                    out.first_token_seconds = time.monotonic() - start
                out.token_ids.extend(tokens)
                if response.is_final:
                    out.finish_reason = response.finish_reason
                    out.text = self.decode(out.token_ids)
        finally:
            stream.close()  # cancels what is still running when we leave early
        return outputs

    def generate_stream(
        self,
        prompt: Prompt,
        lora: str | Path | None = None,
        max_new_tokens: int = 32,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = True,
    ) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as tokens are generated (whole
        characters only). Closing the iterator or Ctrl-C cancels the request."""
        stream = self.generate_iter(
            [prompt], [lora], max_new_tokens, top_k, top_p, temperature, seed, add_special_tokens
        )
        decoder = TextStream(self)
        try:
            for _, tokens, _ in stream:
                piece = decoder.add(tokens)
                if piece:
                    yield piece
        finally:
            stream.close()

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class TextStream:
    """Turns a prompt's token ids, as they arrive, into the text added since the last call.

    Decodes the whole output each time (a token's text can depend on its neighbours) and holds
    back a trailing partial UTF-8 character until its last byte arrives."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        self.token_ids.extend(token_ids)
        full = self._llm.decode(self.token_ids)
        if len(full) <= len(self.text) or full.endswith("\ufffd"):
            return ""
        piece, self.text = full[len(self.text) :], full
        return piece


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, numbers.Integral) for p in prompts):
        raise TypeError(
            "prompts is a list of ints; pass tokenized prompts as a list of lists ([[1, 2, 3]])"
        )
    return prompts


def _per_prompt(adapters, count: int) -> list[str | Path | None]:
    if adapters is None or isinstance(adapters, str | Path):
        return [adapters] * count
    adapters = list(adapters)
    if len(adapters) != count:
        raise ValueError(f"lora has {len(adapters)} entries for {count} prompts")
    return adapters
