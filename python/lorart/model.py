"""A Llama-family model running in the C++ core, with a paged KV cache and LoRA slots.

This is the layer below the executor: it loads an HF checkpoint into ``lorart._core.LlamaModel``
and runs packed batches of sequence chunks that the caller describes (tokens, how much of the
sequence is already cached, which KV blocks it owns, which adapter it uses).
``generate_greedy`` is a small driver for tests and benchmarks; serving goes through the executor.
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from lorart import _core, hf
from lorart._core import LoraConfig, LoraWeights, ModelConfig

logger = logging.getLogger(__name__)


def load_core_model(
    model_dir: str | Path,
    max_num_tokens: int,
    max_lora_rank: int,
    progress: bool | None = None,
    config: ModelConfig | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> _core.LlamaModel:
    """Read an HF checkpoint into the C++ model, its weights stored in ``dtype``: ``"auto"`` (the
    checkpoint's own, :func:`lorart.hf.checkpoint_dtype`), ``"float32"``, ``"float16"`` or
    ``"bfloat16"``. A tensor already in that dtype is read from its file straight into the
    model's buffer (no intermediate copy; the file's pages are never mapped); one in another
    dtype is converted once from the memory-mapped file (rounding to nearest even when narrowing,
    as transformers' ``torch_dtype`` does: a bf16 checkpoint with float32 norms loads them as
    bf16 under ``"auto"``, and a warning on the ``lorart`` logger counts them). Shows a
    progress bar on stderr for checkpoints over 256 MiB (see :func:`progress_bar`) and logs the
    load time to the ``lorart`` logger.

    Raises ``ValueError`` naming the field and the limit for sizes the model cannot take
    (``max_num_tokens``, ``max_lora_rank``, config.json's dimensions, a ``dtype`` outside the
    choices) before reading any weight. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``): where
    the model runs; the weights are read on the host and uploaded once (``lorart.DeviceError``
    when this build has no CUDA backend or the machine no such GPU). ``config`` is the
    directory's ``hf.load_config``, for callers that have read it already.
    """
    if config is None:
        config = hf.load_config(model_dir)
    _core.LlamaModel.workspace_bytes(config, max_num_tokens, max_lora_rank)  # before any weight
    hf.check_checkpoint(model_dir, config)  # from the headers alone, before allocating
    storage = hf.resolve_dtype(dtype, model_dir, config)
    builder = _core.ModelWeightsBuilder(config, storage)
    tensors = list(hf.iter_weight_ranges(model_dir, config))
    total = sum(t[3] for t in tensors)
    start = time.monotonic()
    files: dict[Path, BinaryIO] = {}
    narrowed = 0
    try:
        with progress_bar(total, f"loading {Path(model_dir).name}", "B", total, progress) as bar:
            for name, path, offset, nbytes, stored, array in tensors:
                if stored == storage:
                    if path not in files:
                        files[path] = open(path, "rb", buffering=0)
                    _read_exactly(files[path], offset, builder.destination(name), path, name)
                else:
                    builder.add(name, array)
                    narrowed += array.dtype.itemsize > (4 if storage == "float32" else 2)
                bar.update(nbytes)
    finally:
        for f in files.values():
            f.close()
    if narrowed:
        logger.warning(
            "%s: %d tensor(s) stored in a wider dtype were rounded to %s (dtype=%r); load with "
            "dtype='float32' to keep them exact",
            model_dir,
            narrowed,
            storage,
            dtype,
        )
    model = _core.LlamaModel(config, builder, max_num_tokens, max_lora_rank, device)
    logger.info(
        "loaded %s (%s, %.0f MiB, stored as %s) in %.1f s",
        model_dir,
        config.architecture,
        total / 2**20,
        storage,
        time.monotonic() - start,
    )
    return model


# Bytes per read() while loading: big enough for full disk speed, small enough for the progress
# bar (and Ctrl-C) to keep up.
_READ_CHUNK = 64 * 2**20


def _read_exactly(f: BinaryIO, offset: int, dest: np.ndarray, path: Path, name: str) -> None:
    """Fill ``dest`` (a writable uint8 array) from ``f`` at ``offset``; ``ValueError`` naming the
    file and the tensor if the file ends first (it shrank since its header was checked)."""
    view = memoryview(dest)
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done : done + _READ_CHUNK])
        if not got:
            raise ValueError(
                f"{path}: tensor {name!r}: the file ended {len(view) - done} bytes early "
                "(it changed while loading)"
            )
        done += got


PRECISION_CHOICES = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISION_CHOICES`, else ``ValueError`` naming it."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(
            f"precision must be 'float32' (exact) or 'bfloat16' (bf16 dot products); got "
            f"{precision!r}"
        )
    return precision


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


def _int(value: object, what: str) -> int:
    """``value`` as a Python int; ``TypeError`` naming ``what`` for bools, floats and the like."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None


def _int_array(values: Sequence[int] | np.ndarray, what: str, lo: int, hi: int) -> np.ndarray:
    """``values`` as a 1-D int64 array with every entry in ``[lo, hi)``, else ``ValueError`` (or
    ``TypeError`` for non-integers) naming ``what``, the first bad entry and the range."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        # bools, floats, or ints past int64 (dtype object): find the first bad entry.
        for j, v in enumerate(arr.tolist()):
            v = _int(v, f"{what}[{j}]")
            if not lo <= v < hi:
                raise ValueError(f"{what}[{j}] = {v} is out of range [{lo}, {hi})")
    bad = np.flatnonzero((arr < lo) | (arr >= hi)) if arr.size else arr
    if bad.size:
        raise ValueError(f"{what}[{bad[0]}] = {arr[bad[0]]} is out of range [{lo}, {hi})")
    return arr.astype(np.int64)


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

    def __init__(
        self,
        core: _core.LlamaModel,
        num_kv_blocks: int,
        block_size: int,
        precision: str = "float32",
        kv_cache_dtype: str = "float32",
    ) -> None:
        self._core = core
        self.precision: str = check_precision(precision)
        self.config: ModelConfig = core.config
        self.kv_cache = _core.KvCache(self.config, num_kv_blocks, block_size, kv_cache_dtype)
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
        dtype: str = "auto",
        precision: str = "float32",
        kv_cache_dtype: str = "float32",
    ) -> Model:
        """Load an HF checkpoint directory (``config.json`` + safetensors, float32/16/bf16).

        ``dtype``: how the weights are stored, ``"auto"`` (the checkpoint's own dtype),
        ``"float32"``, ``"float16"`` or ``"bfloat16"`` (see :func:`load_core_model`); the kernels
        widen 16-bit weights to float32 as they read them, so with ``precision="float32"`` a bf16
        checkpoint gives bitwise the logits of its float32 copy. ``precision="bfloat16"`` rounds
        the matmuls' activations to bf16 and uses the CPU's bf16 dot products (faster, not exact).
        ``kv_cache_dtype``: how the KV pool stores keys and values, ``"float32"``, ``"float16"``
        or ``"bfloat16"`` (rounded to nearest even as written, widened to float32 as read).
        A progress bar is shown on stderr for checkpoints over 256 MiB (``progress`` forces it
        on/off).

        Sizes are checked before any weight is read: ``ValueError`` names the field and its limit
        when ``num_kv_blocks`` is outside ``[1, 2**31 - 1]``, ``block_size`` outside
        ``[1, 1024]``, ``max_num_tokens`` or ``max_lora_rank`` outside ``[1, 2**31 - 1]``, or the
        KV pool, the workspace or the weights would exceed this host's memory
        (``lorart._core.host_memory_limit()``).
        """
        check_precision(precision)
        config = hf.load_config(model_dir)
        _core.KvCache.checked_bytes(config, num_kv_blocks, block_size, kv_cache_dtype)
        if threads is not None:
            _core.set_num_threads(threads)
        core = load_core_model(model_dir, max_num_tokens, max_lora_rank, progress, config, dtype)
        return cls(core, num_kv_blocks, block_size, precision, kv_cache_dtype)

    @property
    def weight_dtype(self) -> str:
        """The dtype the weights are stored in (``"auto"`` resolved)."""
        return self._core.weight_dtype

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
        """Validate and load an adapter (its DoRA rows' scales are taken against this model's
        weights); returns its slot for :class:`SequenceChunk`."""
        adapter = _core.LoraAdapter(
            weights, config, self.config, self._core.max_lora_rank, model=self._core
        )
        self._adapters.append(adapter)
        return len(self._adapters) - 1

    def vocab_size(self, lora_slot: int = -1) -> int:
        """The vocabulary of sequences in ``lora_slot``: its adapter's own (an adapter with its
        own ``embed_tokens`` / ``lm_head``), else the model's."""
        if lora_slot >= 0 and self._adapters[lora_slot].vocab_size > 0:
            return self._adapters[lora_slot].vocab_size
        return self.config.vocab_size

    def forward(self, chunks: Sequence[SequenceChunk]) -> list[np.ndarray]:
        """Run one packed batch. Returns, per chunk, logits ``[len(token_ids), vocab]`` when
        ``all_logits`` else ``[1, vocab]`` (its last token), ``vocab`` being the chunk's own
        (:meth:`vocab_size` of its slot).

        Raises ``ValueError`` naming the chunk and the field, before anything is written to the KV
        cache, for: no chunks; more than ``max_num_tokens`` tokens in all; a chunk without tokens;
        a ``lora_slot`` that names no adapter; token ids outside ``[0, vocab_size)`` of the
        chunk's slot; a negative ``context_len``; ``context_len + len(token_ids)`` past
        ``config.max_position_embeddings``; a ``block_table`` too short for those positions or
        with ids outside ``[0, num_kv_blocks)``. ``TypeError`` for fields that are not integers.
        """
        if not chunks:
            raise ValueError("forward needs at least one SequenceChunk")
        lengths = [len(c.token_ids) for c in chunks]
        if sum(lengths) > self.max_num_tokens:
            raise ValueError(
                f"forward: {sum(lengths)} tokens in {len(chunks)} chunk(s); at most "
                f"max_num_tokens = {self.max_num_tokens}"
            )
        ids, tables = zip(*(self._checked_chunk(i, c) for i, c in enumerate(chunks)), strict=True)
        starts = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(lengths, out=starts[1:])
        width = max(1, *(len(t) for t in tables))
        block_tables = np.full((len(chunks), width), -1, dtype=np.int32)  # -1: never a valid block
        for i, table in enumerate(tables):
            block_tables[i, : len(table)] = table
        picks = [
            np.arange(starts[i], starts[i + 1]) if c.all_logits else [starts[i + 1] - 1]
            for i, c in enumerate(chunks)
        ]
        positions = np.concatenate(
            [np.arange(c.context_len, c.context_len + n) for c, n in zip(chunks, lengths)]  # noqa: B905
        ).astype(np.int32)
        logits = self._core.forward(
            np.concatenate(ids).astype(np.int32),
            positions,
            starts,
            np.array([c.context_len for c in chunks], dtype=np.int32),
            block_tables,
            np.array([c.lora_slot for c in chunks], dtype=np.int32),
            np.concatenate(picks).astype(np.int32),
            self.kv_cache,
            self._adapters,
            self.precision,
        )
        bounds = np.cumsum([0] + [len(p) for p in picks])
        return [
            logits[bounds[i] : bounds[i + 1], : self.vocab_size(c.lora_slot)]
            for i, c in enumerate(chunks)
        ]

    def _checked_chunk(self, i: int, chunk: SequenceChunk) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's token ids and block table as int64 arrays, every field in range.

        The C++ forward checks the same rules; checking here too keeps values past int32 from
        failing in the int32 conversion with an ``OverflowError`` that names nothing.
        """
        where = f"chunk {i}"
        slot = _int(chunk.lora_slot, f"{where}: lora_slot")
        if not -1 <= slot < len(self._adapters):
            raise ValueError(
                f"{where}: lora_slot = {slot} names no loaded adapter ({len(self._adapters)} "
                "slot(s); -1 = base model)"
            )
        ids = _int_array(chunk.token_ids, f"{where}: token_ids", 0, self.vocab_size(slot))
        if ids.size == 0:
            raise ValueError(f"{where}: token_ids is empty; a chunk needs at least one token")
        context_len = _int(chunk.context_len, f"{where}: context_len")
        if context_len < 0:
            raise ValueError(f"{where}: context_len = {context_len} is negative")
        end, limit = context_len + ids.size, self.config.max_position_embeddings
        if end > limit:
            raise ValueError(
                f"{where}: context_len {context_len} + {ids.size} token(s) reaches position "
                f"{end}, past max_position_embeddings = {limit}"
            )
        table = _int_array(chunk.block_table, f"{where}: block_table", 0, self.num_kv_blocks)
        needed = -(-end // self.block_size)
        if table.size < needed:
            raise ValueError(
                f"{where}: block_table has {table.size} blocks but positions up to {end} need "
                f"{needed} (block_size {self.block_size})"
            )
        return ids, table

    def generate_greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        lora_slots: Sequence[int] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of all prompts batched together; returns the generated ids.

        Prompts are prefilled in chunks of at most ``max_num_tokens`` tokens per forward; each
        sequence stops after ``max_new_tokens`` tokens or at its first end-of-sequence token,
        which is included in its output. ``eos_token_id`` is one id or a list of ids; ``None``
        (the default) means the model's own, ``config.eos_token_ids`` (config.json's
        ``eos_token_id``), and ``[]`` never stops early. Raises ``ValueError`` for an empty
        prompt, or one that with ``max_new_tokens`` would run past
        ``config.max_position_embeddings``.
        """
        max_new_tokens = _int(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if eos_token_id is None:
            stop = set(self.config.eos_token_ids)
        elif isinstance(eos_token_id, Sequence | np.ndarray):
            stop = {_int(e, f"eos_token_id[{j}]") for j, e in enumerate(eos_token_id)}
        else:
            stop = {_int(eos_token_id, "eos_token_id")}
        slots = list(lora_slots) if lora_slots is not None else [-1] * len(prompts)
        if len(slots) != len(prompts):
            raise ValueError(f"lora_slots has {len(slots)} entries for {len(prompts)} prompts")
        limit = self.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; generation needs at least one token")
            # The last new token is returned, never fed back: it takes no position.
            if len(p) + max_new_tokens - 1 > limit:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} need "
                    f"{len(p) + max_new_tokens - 1} positions, past max_position_embeddings = "
                    f"{limit}"
                )
        if max_new_tokens == 0:
            return [[] for _ in prompts]
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
                if len(outputs[i]) >= max_new_tokens or token in stop:
                    active.discard(i)
                    free.extend(tables[i])
        return outputs
