"""``lorart.LLM``: text in, text out. A tokenizer (``tokenizer.json`` through the ``tokenizers``
library) in front of an :class:`lorart.Executor`, with LoRA adapters named by path.

An adapter directory with its own ``tokenizer.json`` (an adapter that extends the vocabulary, as
chinese-llama-2-lora-13b does) tokenizes its prompts and detokenizes its outputs with it; base
requests and adapters without one use the model's (or ``tokenizer_dir``'s).

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
    lora: str | Path | None = None  # the adapter it ran with (None: the base model)
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


def adapter_tokenizer(adapter_dir: str | Path, own_vocab: bool = True) -> Tokenizer | None:
    """The adapter directory's own ``tokenizer.json``, or None when it has none (its requests then
    use the base model's tokenizer).

    Raises ``ValueError`` for one the tokenizers library cannot read. A directory with only a
    SentencePiece ``tokenizer.model`` (lorart reads ``tokenizer.json``) is refused when the
    adapter brings its own vocabulary (``own_vocab``: the base tokenizer would mis-tokenize it);
    otherwise the base tokenizer serves it, with a warning."""
    path = Path(adapter_dir)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    if (path / "tokenizer.model").is_file():
        hint = (
            "write one beside it with transformers: "
            f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')"
        )
        if own_vocab:
            raise ValueError(
                f"adapter {path}: brings its own vocabulary and a tokenizer.model but no "
                f"tokenizer.json (lorart reads tokenizer.json); {hint}"
            )
        logger.warning(
            "adapter %s: has a tokenizer.model but no tokenizer.json; its vocabulary is the "
            "model's, so the base tokenizer serves it (%s)",
            path,
            hint,
        )
    return None


def check_vocab(
    tokenizer: Tokenizer, vocab_size: int | ModelConfig, where: str = "", whose: str = "model"
) -> bool:
    """Warn when the tokenizer knows fewer ids than the model (or adapter: ``whose``) can
    generate: ids past the tokenizer's vocabulary decode to nothing. True if it warned."""
    if isinstance(vocab_size, ModelConfig):
        vocab_size = vocab_size.vocab_size
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size >= vocab_size:
        return False
    logger.warning(
        "%sthe tokenizer has %d ids but the %s's vocabulary has %d: generated ids >= %d "
        "decode to nothing (is the tokenizer the %s's?)",
        where,
        size,
        whose,
        vocab_size,
        size,
        whose,
    )
    return True


def lora_vocab_size(weights: LoraWeights, model_config: ModelConfig) -> int:
    """The vocabulary of an adapter's requests: the rows of its own embed_tokens / lm_head
    tables when it brings them, else the model's."""
    embeddings = weights.embeddings
    if embeddings is not None and embeddings.vocab_size is not None:
        return embeddings.vocab_size
    return model_config.vocab_size


@dataclass(frozen=True)
class _Adapter:
    task_id: int
    weights: LoraWeights
    config: LoraConfig
    tokenizer: Tokenizer | None  # its own tokenizer.json; None: the base tokenizer


class LLM:
    """Generate text with one base model and any number of LoRA adapters.

    ``device``: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` in a build with the CUDA backend
    (``lorart.DeviceError`` at once otherwise, or when the machine has no such GPU).
    ``num_threads``: CPU threads of the forward (None: the CPUs available to this process).
    ``dtype``: how the weights are stored: ``"auto"`` (the checkpoint's dtype), ``"float32"``,
    ``"float16"``, ``"bfloat16"``. ``precision``: ``"float32"`` (exact: a bf16 checkpoint gives
    the tokens of its float32 copy) or ``"bfloat16"`` (bf16 dot products, faster).
    ``config`` takes :class:`lorart.ExecutorConfig`'s other fields (``max_batch_size``,
    ``max_num_tokens``, ``max_seq_len``, ``max_lora_rank``, ``lora_cache``, ``kv_cache``).
    ``lora_dirs`` are converted and validated against the model's ``config.json`` before the
    checkpoint loads, so a bad adapter fails in seconds; other adapters are converted on first
    use (each once, its tokenizer with it). ``adapter_tokenizers=False`` tokenizes every prompt
    with ``tokenizer_dir``'s tokenizer, adapters' own ignored (``lorart run --tokenizer_dir``, as
    TensorRT-LLM's run.py). Use it as a context manager (or call :meth:`shutdown`) to stop the
    executor's thread.
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
        adapter_tokenizers: bool = True,
        **config: object,
    ) -> None:
        model_config = hf.load_config(model_dir)
        tokenizer_path = tokenizer_dir if tokenizer_dir is not None else model_dir
        self.tokenizer = load_tokenizer(tokenizer_path)
        self._tokenizer_path = tokenizer_path
        self.adapter_tokenizers = adapter_tokenizers
        check_vocab(self.tokenizer, model_config, where=f"{tokenizer_path}: ")
        executor_config = ExecutorConfig(
            device=device, num_threads=num_threads, dtype=dtype, precision=precision, **config
        )
        self._adapters: dict[Path, _Adapter] = {}
        self._lock = threading.Lock()
        self._max_lora_rank = executor_config.max_lora_rank
        # A missing device (DeviceError) or a bad size fails here, before adapters convert.
        executor_config.resolve(model_config)
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
    ) -> _Adapter:
        """The converted adapter (converted, validated and its tokenizer read on first use)."""
        path = Path(adapter_dir).resolve()
        model_config = model_config if model_config is not None else self.executor.model_config
        with self._lock:
            if path not in self._adapters:
                weights, config = lora.load_dir(path, model_config)
                try:
                    lora.validate(weights, config, model_config, self._max_lora_rank)
                except ValueError as err:
                    raise type(err)(f"adapter {path}: {err}") from None
                vocab = lora_vocab_size(weights, model_config)
                tokenizer = None
                if self.adapter_tokenizers:
                    tokenizer = adapter_tokenizer(path, vocab > model_config.vocab_size)
                check_vocab(
                    tokenizer or self.tokenizer,
                    vocab,
                    where=f"adapter {path}: "
                    + ("" if tokenizer else f"tokenizer {self._tokenizer_path}: "),
                    whose="adapter",
                )
                self._adapters[path] = _Adapter(len(self._adapters), weights, config, tokenizer)
            return self._adapters[path]

    def tokenizer_for(self, lora: str | Path | None = None) -> Tokenizer:
        """The tokenizer of ``lora``'s prompts and outputs: the adapter directory's own
        ``tokenizer.json`` when it has one (and ``adapter_tokenizers``), else the base one."""
        if lora is None:
            return self.tokenizer
        return self._adapter(lora).tokenizer or self.tokenizer

    def vocab_size(self, lora: str | Path | None = None) -> int:
        """The vocabulary of ``lora``'s requests: its own (an adapter that replaces
        ``embed_tokens`` / ``lm_head`` with bigger tables) or the model's."""
        model_config = self.executor.model_config
        if lora is None:
            return model_config.vocab_size
        return lora_vocab_size(self._adapter(lora).weights, model_config)

    def encode(
        self, prompt: Prompt, add_special_tokens: bool = True, lora: str | Path | None = None
    ) -> list[int]:
        """Token ids of ``prompt`` (text is tokenized with ``lora``'s tokenizer; token ids are
        returned as they are)."""
        if isinstance(prompt, str):
            tokenizer = self.tokenizer_for(lora)
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
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
            converted = self._adapter(adapter)
            request.lora_task_id = converted.task_id
            # Always attached: the cache matches identical weights without copying them again,
            # and an idle task may be evicted between any check here and the enqueue.
            request.lora_weights = converted.weights
            request.lora_config = converted.config
        return request

    def check_prompt(self, index: int, ids: Sequence[int], lora: str | Path | None) -> None:
        """ValueError naming the prompt, the id and the limit when a token id is outside the
        vocabulary of the adapter (or base model) the prompt runs with."""
        vocab = self.vocab_size(lora)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            whose = f"adapter {lora}'s" if lora is not None else "the base model's"
            raise ValueError(
                f"prompt {index}: token id {bad} is outside {whose} vocabulary [0, {vocab})"
            )

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
        ids = [
            self.encode(p, add_special_tokens, a) for p, a in zip(prompts, adapters, strict=True)
        ]
        for i, (prompt_ids, adapter) in enumerate(zip(ids, adapters, strict=True)):
            self.check_prompt(i, prompt_ids, adapter)  # all of them before any is enqueued
        requests = [
            self._request(p, a, max_new_tokens, sampling)
            for p, a in zip(ids, adapters, strict=True)
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
        adapters = _per_prompt(lora, len(prompts))
        start = time.monotonic()
        outputs = [
            GenerationOutput("", [], "", self.encode(p, add_special_tokens, a), lora=a)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        stream = self.generate_iter(
            [out.prompt_token_ids for out in outputs],
            adapters,
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
                    out.text = self.decode(out.token_ids, lora=out.lora)
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
        decoder = TextStream(self, lora)
        try:
            for _, tokens, _ in stream:
                piece = decoder.add(tokens)
                if piece:
                    yield piece
        finally:
            stream.close()

    def decode(
        self,
        token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        lora: str | Path | None = None,
    ) -> str:
        """The text of ``token_ids``, detokenized with ``lora``'s tokenizer."""
        tokenizer = self.tokenizer_for(lora)
        return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class TextStream:
    """Turns a prompt's token ids, as they arrive, into the text added since the last call
    (decoded with ``lora``'s tokenizer).

    Decodes the whole output each time (a token's text can depend on its neighbours) and holds
    back a trailing partial UTF-8 character until its last byte arrives."""

    def __init__(self, llm: LLM, lora: str | Path | None = None) -> None:
        self._tokenizer = llm.tokenizer_for(lora)
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        self.token_ids.extend(token_ids)
        full = self._tokenizer.decode(self.token_ids)
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
