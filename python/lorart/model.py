"""A Llama-family model running in the C++ core, with a paged KV cache and LoRA slots.

This is the layer below the executor: it loads an HF checkpoint into ``lorart._core.LlamaModel``
and runs packed batches of sequence chunks that the caller describes (tokens, how much of the
sequence is already cached, which KV blocks it owns, which adapter it uses).
``generate_greedy`` is a small driver for tests and benchmarks; serving goes through the executor.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lorart import _core, hf
from lorart._core import LoraConfig, LoraWeights, ModelConfig

logger = logging.getLogger(__name__)


def load_core_model(
    model_dir: str | Path, max_num_tokens: int, max_lora_rank: int, progress: bool | None = None
) -> _core.LlamaModel:
    """Read an HF checkpoint into the C++ model (weights converted to float32 once, from
    memory-mapped files). Shows a progress bar on stderr for checkpoints over 256 MiB (see
    :func:`progress_bar`) and logs the load time to the ``lorart`` logger."""
    config = hf.load_config(model_dir)
    builder = _core.ModelWeightsBuilder(config)
    tensors = list(hf.iter_weights(model_dir, config))
    total = sum(a.nbytes for _, a in tensors)
    start = time.monotonic()
    with progress_bar(total, f"loading {Path(model_dir).name}", "B", total, progress) as bar:
        for name, array in tensors:
            builder.add(name, array)
            bar.update(array.nbytes)
    model = _core.LlamaModel(config, builder, max_num_tokens, max_lora_rank)
    logger.info(
        "loaded %s (%s, %.0f MiB) in %.1f s",
        model_dir,
        config.architecture,
        total / 2**20,
        time.monotonic() - start,
    )
    return model


# Work smaller than this finishes too quickly to need a progress bar.
PROGRESS_MIN_BYTES = 256 * 2**20


def progress_bar(
    total: int, desc: str, unit: str, size_bytes: int, progress: bool | None = None
) -> tqdm:
    """A tqdm bar on stderr counting ``total`` ``unit`` s (``"B"``: shown as KiB/MiB/GiB).

    Shown when ``progress`` is True; when None, for work that reads over 256 MiB
    (``size_bytes``) unless the ``lorart`` logger's level is above INFO
    (``logging.getLogger("lorart").setLevel(logging.WARNING)``, or ``lorart ... --quiet``)."""
    if progress is None:
        level = logging.getLogger("lorart").level  # NOTSET (0) unless someone chose a level
        progress = size_bytes > PROGRESS_MIN_BYTES and level <= logging.INFO
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


@dataclass
class SequenceChunk:
    """Part of one sequence in a forward: ``token_ids`` get positions ``context_len ...``.

    ``block_table[i]`` is the KV block holding positions ``i*block_size ...``; it must cover
    ``context_len + len(token_ids)`` positions. ``lora_slot`` is an adapter slot from
    :meth:`Model.add_adapter`, or -1 for the base model. ``all_logits`` asks for the logits of
    every token of the chunk instead of only the last.
    """

    token_ids: Sequence[int]
    context_len: int
    block_table: Sequence[int]
    lora_slot: int = -1
    all_logits: bool = False


class Model:
    """A loaded model plus its KV pool and adapter slots. Not thread-safe."""

    def __init__(self, core: _core.LlamaModel, num_kv_blocks: int, block_size: int) -> None:
        self._core = core
        self.config: ModelConfig = core.config
        self.kv_cache = _core.KvCache(self.config, num_kv_blocks, block_size)
        self._adapters: list[_core.LoraAdapter] = []

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_num_tokens: int = 2048,
        num_kv_blocks: int = 256,
        block_size: int = 16,
        max_lora_rank: int = 64,
        threads: int | None = None,
        progress: bool | None = None,
    ) -> Model:
        """Load an HF checkpoint directory (``config.json`` + safetensors, float32/16/bf16).

        Weights are converted to float32 once, straight from the memory-mapped files. A progress
        bar is shown on stderr for checkpoints over 256 MiB (``progress`` forces it on/off).
        """
        if threads is not None:
            _core.set_num_threads(threads)
        core = load_core_model(model_dir, max_num_tokens, max_lora_rank, progress)
        return cls(core, num_kv_blocks, block_size)

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def max_num_tokens(self) -> int:
        return self._core.max_num_tokens

    def add_adapter(self, weights: LoraWeights, config: LoraConfig) -> int:
        """Validate and load an adapter; returns its slot for :class:`SequenceChunk`."""
        adapter = _core.LoraAdapter(weights, config, self.config, self._core.max_lora_rank)
        self._adapters.append(adapter)
        return len(self._adapters) - 1

    def forward(self, chunks: Sequence[SequenceChunk]) -> list[np.ndarray]:
        """Run one packed batch. Returns, per chunk, logits ``[len(token_ids), vocab]`` when
        ``all_logits`` else ``[1, vocab]`` (its last token). Raises ``ValueError`` naming the
        field for a malformed batch, before anything is written to the KV cache."""
        if not chunks:
            raise ValueError("forward needs at least one SequenceChunk")
        lengths = [len(c.token_ids) for c in chunks]
        starts = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(lengths, out=starts[1:])
        for i, c in enumerate(chunks):
            needed = -(-(c.context_len + len(c.token_ids)) // self.block_size)
            if len(c.block_table) < needed:
                raise ValueError(
                    f"chunk {i}: block_table has {len(c.block_table)} blocks but positions up to "
                    f"{c.context_len + len(c.token_ids)} need {needed} (block_size "
                    f"{self.block_size})"
                )
        width = max(1, *(len(c.block_table) for c in chunks))
        tables = np.full((len(chunks), width), -1, dtype=np.int32)  # -1: never a valid block
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        picks = [
            np.arange(starts[i], starts[i + 1]) if c.all_logits else [starts[i + 1] - 1]
            for i, c in enumerate(chunks)
        ]
        logits = self._core.forward(
            np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks]).astype(
                np.int32
            ),
            starts,
            np.array([c.context_len for c in chunks], dtype=np.int32),
            tables,
            np.array([c.lora_slot for c in chunks], dtype=np.int32),
            np.concatenate(picks).astype(np.int32),
            self.kv_cache,
            self._adapters,
        )
        bounds = np.cumsum([0] + [len(p) for p in picks])
        return [logits[bounds[i] : bounds[i + 1]] for i in range(len(chunks))]

    def generate_greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        lora_slots: Sequence[int] | None = None,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of all prompts batched together; returns the generated ids.

        Prompts are prefilled in chunks of at most ``max_num_tokens`` tokens per forward; each
        sequence stops after ``max_new_tokens`` or at ``eos_token_id`` (included).
        """
        slots = list(lora_slots) if lora_slots is not None else [-1] * len(prompts)
        if len(slots) != len(prompts):
            raise ValueError(f"lora_slots has {len(slots)} entries for {len(prompts)} prompts")
        free = list(range(self.num_kv_blocks))[::-1]
        tables: list[list[int]] = [[] for _ in prompts]
        cached = [0] * len(prompts)
        pending = [list(p) for p in prompts]  # tokens not yet in the cache
        outputs: list[list[int]] = [[] for _ in prompts]
        active = set(range(len(prompts)))

        def reserve(i: int, upto: int) -> None:
            while len(tables[i]) * self.block_size < upto:
                if not free:
                    raise ValueError("generate_greedy: out of KV blocks; raise num_kv_blocks")
                tables[i].append(free.pop())

        while active:
            budget, chunks, members = self.max_num_tokens, [], []
            for i in sorted(active):
                take = min(len(pending[i]), budget)
                if take == 0:
                    continue
                reserve(i, cached[i] + take)
                chunks.append(SequenceChunk(pending[i][:take], cached[i], tables[i], slots[i]))
                members.append((i, take))
                budget -= take
            logits = self.forward(chunks)
            for (i, take), out in zip(members, logits, strict=True):
                cached[i] += take
                pending[i] = pending[i][take:]
                if pending[i]:
                    continue  # prompt not fully prefilled yet
                token = int(np.argmax(out[-1]))
                outputs[i].append(token)
                pending[i] = [token]
                if len(outputs[i]) >= max_new_tokens or token == eos_token_id:
                    active.discard(i)
                    free.extend(tables[i])
        return outputs
