"""The adapters a server knows by name: each gets its own LoRA task id (never reused, so the
executor's cache can never confuse two adapters), and its converted weights are kept here and
sent with every request, so no request depends on what the cache still holds. An adapter
directory's own ``tokenizer.json`` (and chat template) is read with it, once: its requests are
tokenized and detokenized with it.

Runtime loading reads only from under ``--lora-root``: the requested path is resolved with every
symlink followed and must stay inside the resolved root."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from lorart import lora
from lorart._core import LoraConfig, LoraWeights, ModelConfig
from lorart.llm import adapter_tokenizer, check_vocab, lora_vocab_size
from lorart.serve.chat import ChatTemplate
from lorart.serve.protocol import ApiError


@dataclass(frozen=True)
class Adapter:
    name: str
    task_id: int
    path: Path
    weights: LoraWeights
    config: LoraConfig
    vocab_size: int  # its requests' vocabulary (its own embed_tokens / lm_head, else the model's)
    tokenizer: Tokenizer | None = None  # its own tokenizer.json; None: the server's
    chat_template: ChatTemplate | None = None  # its own; None: the server's


class AdapterRegistry:
    """Thread-safe name -> Adapter map."""

    def __init__(
        self,
        model_config: ModelConfig,
        max_lora_rank: int,
        root: str | None,
        base_tokenizer: Tokenizer | None = None,
    ) -> None:
        self._model_config = model_config
        self._base_tokenizer = base_tokenizer  # checked against adapters that have none
        self._max_rank = max_lora_rank
        self.root = Path(root).resolve(strict=True) if root else None
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._next_task_id = 1

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.get(name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)

    def resolve_runtime_path(self, path: str) -> Path:
        """``path`` (relative to the root, or absolute) as a real directory under the root;
        ApiError 403 when runtime loading is off or the path leaves the root, 404 when there is
        nothing there."""
        if self.root is None:
            raise ApiError(
                403, "runtime adapter loading is off: start the server with --lora-root DIR"
            )
        if "\0" in path:
            raise ApiError(400, "lora_path must not contain NUL characters", param="lora_path")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        real = Path(os.path.realpath(candidate))
        if not self._inside(real):
            raise ApiError(
                403,
                f"lora_path {path!r} resolves outside --lora-root ({self.root})",
                param="lora_path",
            )
        if not real.is_dir():
            raise ApiError(404, f"lora_path {path!r}: no adapter directory there", "lora_path")
        for entry in real.iterdir():  # the adapter's files must not lead out either
            if not self._inside(Path(os.path.realpath(entry))):
                raise ApiError(
                    403,
                    f"lora_path {path!r}: {entry.name} resolves outside --lora-root",
                    param="lora_path",
                )
        return real

    def _inside(self, real: Path) -> bool:
        return os.path.commonpath([real, self.root]) == str(self.root)

    def add(self, name: str, path: Path, served_model_name: str) -> Adapter:
        """Converts and validates the adapter at ``path`` (PEFT or .npy directory) and names it;
        ApiError 400 with the validation message when it does not fit the model."""
        if name == served_model_name:
            raise ApiError(400, f"lora_name {name!r} is the base model's name", "lora_name")
        with self._lock:
            if name in self._by_name:
                raise ApiError(400, f"an adapter named {name!r} is already loaded", "lora_name")
        try:
            weights, config = lora.load_dir(path, self._model_config)
            lora.validate(weights, config, self._model_config, self._max_rank)
            vocab = lora_vocab_size(weights, self._model_config)
            tokenizer = adapter_tokenizer(path, vocab > self._model_config.vocab_size)
            template = ChatTemplate.from_dir(path)
        except (ValueError, OSError) as err:  # FileNotFoundError and PermissionError included
            raise ApiError(400, f"adapter {name!r} ({path}): {err}", "lora_path") from None
        if tokenizer is not None or self._base_tokenizer is not None:
            check_vocab(
                tokenizer or self._base_tokenizer,
                vocab,
                where=f"adapter {name!r} ({path}): ",
                whose="adapter",
            )
        with self._lock:
            if name in self._by_name:  # another load of the same name won the race
                raise ApiError(400, f"an adapter named {name!r} is already loaded", "lora_name")
            adapter = Adapter(
                name, self._next_task_id, path, weights, config, vocab, tokenizer, template
            )
            self._next_task_id += 1
            self._by_name[name] = adapter
        return adapter

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._by_name.pop(name, None)
        if adapter is None:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "lora_name")
        return adapter
