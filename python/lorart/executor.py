"""``lorart.Executor``: the in-flight batching loop (C++, background thread) over one model.

Names follow DESIGN.md's public API: ``enqueue_request`` returns a request id at once,
``await_responses`` blocks (the GIL released, Ctrl-C honoured) until responses arrive,
``cancel_request``, ``stats`` and ``shutdown``. Bad requests never raise here: they come back as a
final :class:`Response` with ``finish_reason == "error"``, the message in ``error`` and whose
fault it is in ``error_kind`` (``"invalid_request"``: the request broke a rule; ``"internal"``:
the runtime failed, e.g. out of memory or non-finite logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorart import _core, hf
from lorart._core import ExecutorConfig, InferenceRequest, ModelConfig, Response
from lorart.model import load_core_model


class Executor:
    """Loads an HF checkpoint directory and serves :class:`InferenceRequest` s on it.

    ``config`` is checked against the checkpoint's ``config.json`` (``ExecutorConfig.resolve``:
    limits, ``max_seq_len`` against ``max_position_embeddings``, memory) before any weight is
    read, so a bad size fails at once with a ``ValueError`` naming the field. The weights are
    stored in ``config.dtype`` (``"auto"``: the checkpoint's) and the matmuls run at
    ``config.precision``, on ``config.device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; a
    ``lorart.DeviceError`` naming it, before any weight is read, when this build has no CUDA
    backend or the machine no such GPU).
    """

    def __init__(self, model_dir: str | Path, config: ExecutorConfig | None = None) -> None:
        config = config if config is not None else ExecutorConfig()
        model_config = hf.load_config(model_dir)
        config.resolve(model_config)
        model = load_core_model(
            model_dir,
            config.max_num_tokens,
            config.max_lora_rank,
            config=model_config,
            dtype=config.dtype,
            device=config.device,
        )
        self._weight_dtype: str = model.weight_dtype
        self._core = _core.Executor(model, config)

    @property
    def config(self) -> ExecutorConfig:
        """The configuration it runs with (a copy): ``max_seq_len`` and ``num_threads`` resolved
        from their 0/None defaults."""
        return self._core.config

    @property
    def weight_dtype(self) -> str:
        """The dtype the model's weights are stored in (``"auto"`` resolved)."""
        return self._weight_dtype

    @property
    def model_config(self) -> ModelConfig:
        return self._core.model_config

    def enqueue_request(self, request: InferenceRequest) -> int:
        """Queue a request (thread-safe, returns at once); the result comes from
        :meth:`await_responses`."""
        return self._core.enqueue_request(request)

    def enqueue_shared(self, request: InferenceRequest) -> int:
        """As :meth:`enqueue_request`, but the responses go to the executor's shared queue,
        which :meth:`await_any` reads for every such request at once (one waiting thread for
        many requests, as a server's dispatcher wants); :meth:`await_responses` refuses its id."""
        return self._core.enqueue_shared(request)

    def await_any(self, timeout: float | None = None) -> list[Response]:
        """Every response in the shared queue, waiting until there is one (or ``timeout``
        seconds: then an empty list); each carries its ``request_id`` and a request's final one
        ends it. Timeouts and Ctrl-C as for :meth:`await_responses`."""
        return self._core.await_any(timeout)

    def await_responses(self, request_id: int, timeout: float | None = None) -> list[Response]:
        """Responses of ``request_id`` ready so far, waiting for at least one (or ``timeout``
        seconds: then an empty list; ``None`` or ``inf`` wait without a deadline, NaN or a negative
        value is a ``ValueError``). The last one of a request has ``is_final=True``; a streaming
        request yields one per generated step before it. Ctrl-C raises ``KeyboardInterrupt``
        within 0.1 s. Several threads may wait on one id: each response goes to one of them, and
        the others get ``ValueError`` once the final response went to another."""
        return self._core.await_responses(request_id, timeout)

    def cancel_request(self, request_id: int) -> None:
        """Stop a request; its final response has ``finish_reason == "cancelled"``."""
        self._core.cancel_request(request_id)

    def release_request(self, request_id: int) -> None:
        """Say that nobody will read ``request_id``'s responses (a client that went away): those
        queued are dropped, later ones too, and the executor forgets the request at its final
        response. It does not stop the request (:meth:`cancel_request` does); waiters on it get
        ``ValueError``. Unknown or already collected ids are ignored."""
        self._core.release_request(request_id)

    def stats(self) -> dict[str, Any]:
        """Queue lengths, steps, tokens and tokens/s, KV blocks, ``num_threads``, ``uncollected``
        (requests whose responses still wait for a reader), and LoRA cache hits, misses,
        evictions, replacements, bytes and tasks per level. Booked before the responses they
        count are visible."""
        return self._core.stats()

    def contains_lora_task(self, task_id: int) -> bool:
        """Whether the host level of the LoRA cache holds ``task_id``."""
        return self._core.contains_lora_task(task_id)

    def lora_task_on_device(self, task_id: int) -> bool:
        """Whether ``task_id`` is resident on the device level of the LoRA cache."""
        return self._core.lora_task_on_device(task_id)

    def shutdown(self) -> None:
        """Stop the loop; unfinished requests end with ``finish_reason == "cancelled"``.
        Idempotent; several threads may call it at once."""
        self._core.shutdown()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
