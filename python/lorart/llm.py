"""``lorart.LLM``: text in, text out. A tokenizer (``tokenizer.json`` through the ``tokenizers``
library) in front of an :class:`lorart.Executor`, with LoRA adapters named by path.

Adapters (PEFT directories or TensorRT-LLM ``.npy`` directories) get task ids automatically and
are converted once; a request sends the weights only when the executor's LoRA cache does not
hold its task.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from lorart import lora
from lorart._core import ExecutorConfig, InferenceRequest, LoraConfig, LoraWeights, SamplingConfig
from lorart.executor import Executor


@dataclass
class GenerationOutput:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "end_id", "stop", "cancelled"


class LLM:
    """Generate text with one base model and any number of LoRA adapters.

    ``num_threads``: CPU threads of the forward (None: the CPUs available to this process).
    ``config`` takes :class:`lorart.ExecutorConfig`'s other fields (``max_batch_size``,
    ``max_num_tokens``, ``max_seq_len``, ``max_lora_rank``, ``lora_cache``, ``kv_cache``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
        **config: object,
    ) -> None:
        tokenizer_path = Path(tokenizer_dir if tokenizer_dir is not None else model_dir)
        if tokenizer_path.is_dir():
            tokenizer_path = tokenizer_path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tokenizer_path}")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.executor = Executor(
            model_dir, ExecutorConfig(device=device, num_threads=num_threads, **config)
        )
        self._adapters: dict[Path, tuple[int, LoraWeights, LoraConfig]] = {}
        self._lock = threading.Lock()

    @property
    def eos_token_id(self) -> int | None:
        eos = self.executor.model_config.eos_token_ids
        return eos[0] if eos else None

    def _adapter(self, adapter_dir: str | Path) -> tuple[int, LoraWeights, LoraConfig]:
        path = Path(adapter_dir).resolve()
        with self._lock:
            if path not in self._adapters:
                if lora.is_npy_dir(path):
                    weights, config = lora.load_npy(path)
                else:
                    weights, config = lora.from_peft(path, self.executor.model_config)
                self._adapters[path] = (len(self._adapters), weights, config)
            return self._adapters[path]

    def _request(
        self,
        prompt: str,
        adapter: str | Path | None,
        max_new_tokens: int,
        sampling: SamplingConfig,
        add_special_tokens: bool,
        streaming: bool,
    ) -> InferenceRequest:
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        request = InferenceRequest(
            ids,
            max_new_tokens=max_new_tokens,
            sampling_config=sampling,
            end_id=self.eos_token_id,
            streaming=streaming,
        )
        if adapter is not None:
            task_id, weights, config = self._adapter(adapter)
            request.lora_task_id = task_id
            if not self.executor.contains_lora_task(task_id):  # first use, or evicted since
                request.lora_weights = weights
                request.lora_config = config
        return request

    def generate(
        self,
        prompts: str | Sequence[str],
        lora: Sequence[str | Path | None] | str | Path | None = None,
        max_new_tokens: int = 32,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[GenerationOutput]:
        """Run every prompt (all in flight together); ``lora[i]`` is prompt ``i``'s adapter
        directory or ``None`` for the base model. Greedy by default (``top_k=1``). Raises
        ``ValueError`` with the executor's message when a request fails."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        adapters = _per_prompt(lora, len(prompts))
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
        ids = [
            self.executor.enqueue_request(
                self._request(p, a, max_new_tokens, sampling, add_special_tokens, False)
            )
            for p, a in zip(prompts, adapters, strict=True)
        ]
        outputs = []
        for i, request_id in enumerate(ids):
            final = self.executor.await_responses(request_id)[-1]
            if final.error is not None:
                raise ValueError(f"prompt {i}: {final.error}")
            tokens = list(final.output_token_ids)
            outputs.append(GenerationOutput(self.decode(tokens), tokens, final.finish_reason))
        return outputs

    def generate_stream(
        self,
        prompt: str,
        lora: str | Path | None = None,
        max_new_tokens: int = 32,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        add_special_tokens: bool = True,
    ) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as tokens are generated."""
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
        request_id = self.executor.enqueue_request(
            self._request(prompt, lora, max_new_tokens, sampling, add_special_tokens, True)
        )
        tokens: list[int] = []
        text = ""
        while True:
            for response in self.executor.await_responses(request_id):
                if response.error is not None:
                    raise ValueError(response.error)
                tokens.extend(response.output_token_ids)
                full = self.decode(tokens)
                if len(full) > len(text) and not full.endswith("\ufffd"):  # whole characters only
                    yield full[len(text) :]
                    text = full
                if response.is_final:
                    return

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _per_prompt(adapters, count: int) -> list[str | Path | None]:
    if adapters is None or isinstance(adapters, str | Path):
        return [adapters] * count
    adapters = list(adapters)
    if len(adapters) != count:
        raise ValueError(f"lora has {len(adapters)} entries for {count} prompts")
    return adapters
