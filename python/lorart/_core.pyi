# Type stubs of the compiled module lorart._core (csrc/bindings/). Generated from the built
# module with `python -m pybind11_stubgen lorart._core -o python` (the docstrings are the
# bindings'; the two exception classes, which the generator imports from lorart, are written
# out here); tests/python/test_core_stubs.py checks that they name what the module exports.
"""
lorart core: tensors, LoRA format and validation, model configuration (C++)
"""

from __future__ import annotations

import collections.abc
import typing

import numpy
import numpy.typing

class LoraError(ValueError):
    """An adapter broke a rule of the LoRA format (the message names it); exported as
    lorart.LoraError."""

class DeviceError(RuntimeError):
    """A device is missing or has no implementation of an op; exported as lorart.DeviceError."""

__all__: list[str] = [
    "DeviceError",
    "Executor",
    "ExecutorConfig",
    "InferenceRequest",
    "KvCache",
    "KvCacheConfig",
    "LlamaModel",
    "LoraAdapter",
    "LoraCacheConfig",
    "LoraConfig",
    "LoraEmbeddings",
    "LoraError",
    "LoraWeights",
    "ModelConfig",
    "ModelWeightsBuilder",
    "Response",
    "RopeScaling",
    "SamplingConfig",
    "available_cpus",
    "build_info",
    "get_num_threads",
    "host_memory_limit",
    "lora_modules",
    "num_threads",
    "set_num_threads",
    "validate_lora",
]

class RopeScaling:
    """
    Rotary embedding scaling (default, linear, llama3).
    """

    rope_type: str
    def __init__(self) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def factor(self) -> float: ...
    @factor.setter
    def factor(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def high_freq_factor(self) -> float: ...
    @high_freq_factor.setter
    def high_freq_factor(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def low_freq_factor(self) -> float: ...
    @low_freq_factor.setter
    def low_freq_factor(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def original_max_position_embeddings(self) -> int: ...
    @original_max_position_embeddings.setter
    def original_max_position_embeddings(
        self, arg0: typing.SupportsInt | typing.SupportsIndex
    ) -> None: ...

class ModelConfig:
    """
    Shape of a Llama-family model; see lorart.hf.load_config.
    """

    supported_architectures: typing.ClassVar[list] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    ]
    architecture: str
    attention_bias: bool
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    def __init__(self) -> None: ...
    def __repr__(self) -> str: ...
    def copy(self) -> ModelConfig:
        """
        An independent copy.
        """
    def has_lora_module(self, module_id: typing.SupportsInt | typing.SupportsIndex) -> bool: ...
    def lora_module_dims(
        self, module_id: typing.SupportsInt | typing.SupportsIndex
    ) -> tuple[int, int]:
        """
        (in, out) sizes of a module's LoRA pair: A [r, in], B [out, r].
        """
    def lora_module_ids(self) -> list[int]:
        """
        LoRA module ids this model has, ascending.
        """
    def validate(self) -> None:
        """
        Raise ValueError naming the first missing or inconsistent field.
        """
    @property
    def bos_token_id(self) -> int: ...
    @bos_token_id.setter
    def bos_token_id(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def dtype(self) -> str:
        """
        The checkpoint's stored dtype: 'float32', 'float16' or 'bfloat16'.
        """
    @dtype.setter
    def dtype(self, arg1: str) -> None: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @eos_token_ids.setter
    def eos_token_ids(
        self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]
    ) -> None: ...
    @property
    def head_dim(self) -> int: ...
    @head_dim.setter
    def head_dim(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def hidden_size(self) -> int: ...
    @hidden_size.setter
    def hidden_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def intermediate_size(self) -> int: ...
    @intermediate_size.setter
    def intermediate_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @max_position_embeddings.setter
    def max_position_embeddings(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def num_attention_heads(self) -> int: ...
    @num_attention_heads.setter
    def num_attention_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def num_kv_heads(self) -> int: ...
    @num_kv_heads.setter
    def num_kv_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def num_layers(self) -> int: ...
    @num_layers.setter
    def num_layers(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def rms_norm_eps(self) -> float: ...
    @rms_norm_eps.setter
    def rms_norm_eps(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def rope_theta(self) -> float: ...
    @rope_theta.setter
    def rope_theta(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def sliding_window(self) -> int: ...
    @sliding_window.setter
    def sliding_window(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    @vocab_size.setter
    def vocab_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...

class LoraConfig:
    """
    [rows, 3] int32: [module_id, layer_idx, adapter_size] per row, or [rows, 4] with TensorRT-LLM's is_dora column (0 or 1). Accepts numpy arrays, torch tensors (DLPack) or nested lists, 2-D or TensorRT-LLM's 3-D [1, rows, 3 or 4]; wraps the array without a copy.
    """
    def __init__(self, array: typing.Any) -> None: ...
    def __len__(self) -> int: ...
    def __repr__(self) -> str: ...
    def numpy(self) -> numpy.ndarray:
        """
        Read-only numpy view [rows, 3 or 4] (no copy).
        """
    @property
    def num_columns(self) -> int: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def shape(self) -> tuple: ...

class LoraEmbeddings:
    """
    An adapter's embedding-side parts, each optional: embed_tokens [V, H] and lm_head [V, H] (PEFT modules_to_save: replacement tables, V may exceed the base vocabulary), embed_lora_a [r, V] and embed_lora_b [H, r] (LoRA on embed_tokens), lm_head_lora_a [r, H] and lm_head_lora_b [V, r] (LoRA on lm_head); B parts carry the scaling. float32, float16 or bfloat16 arrays, wrapped without a copy; the same array given as embed_tokens and lm_head keeps them tied (stored once). Attach it to LoraWeights.
    """
    def __init__(
        self,
        *,
        embed_tokens: typing.Any = None,
        lm_head: typing.Any = None,
        embed_lora_a: typing.Any = None,
        embed_lora_b: typing.Any = None,
        lm_head_lora_a: typing.Any = None,
        lm_head_lora_b: typing.Any = None,
    ) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def embed_lora_a(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def embed_lora_b(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def embed_tokens(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def lm_head(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def lm_head_is_embed_tokens(self) -> bool: ...
    @property
    def lm_head_lora_a(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def lm_head_lora_b(self) -> typing.Any:
        """
        Read-only numpy view (no copy), or None.
        """
    @property
    def nbytes(self) -> int: ...
    @property
    def vocab_size(self) -> typing.Any:
        """
        Rows of embed_tokens / lm_head (the adapter's vocabulary), None when it keeps the model's.
        """

class LoraWeights:
    """
    [rows, max_row] float32/float16/bfloat16: row i = flatten(A_i) ++ flatten(B_i) ++ zero padding, scaling folded into B. Accepts numpy arrays, torch tensors (DLPack) or nested lists, 2-D or 3-D [1, rows, max_row]; wraps the array without a copy. A DoRA row (is_dora = 1 in LoraConfig) appends its magnitude [Ho]. `embeddings` (LoraEmbeddings) are the adapter's embedding-side parts; with them the rows may be empty ([0, 0]).
    """
    def __init__(self, array: typing.Any, embeddings: LoraEmbeddings = None) -> None: ...
    def __len__(self) -> int: ...
    def __repr__(self) -> str: ...
    def numpy(self) -> numpy.ndarray:
        """
        Read-only numpy view [rows, max_row] of the rows (no copy; bfloat16 as ml_dtypes.bfloat16).
        """
    def to(self, dtype: str) -> LoraWeights:
        """
        An owning copy, rows and embedding-side parts converted to dtype (round-to-nearest-even).
        """
    @property
    def dtype(self) -> str: ...
    @property
    def embeddings(self) -> LoraEmbeddings:
        """
        The embedding-side parts (LoraEmbeddings), or None.
        """
    @property
    def nbytes(self) -> int:
        """
        Bytes of the rows and the embedding-side parts.
        """
    @property
    def num_rows(self) -> int: ...
    @property
    def shape(self) -> tuple: ...

class ModelWeightsBuilder:
    """
    Collects HF-named checkpoint tensors into weights of one storage dtype (float32, float16 or bfloat16): tensors of that dtype are copied as they are, others converted.
    """
    def __init__(self, config: ModelConfig, dtype: str = "float32") -> None: ...
    def add(self, name: str, array: typing.Any) -> None: ...
    def destination(self, name: str) -> numpy.ndarray:
        """
        The bytes tensor `name` occupies in the storage dtype (a writable uint8 array), for a loader that reads the checkpoint straight into it; counts the tensor as added.
        """
    def missing(self) -> list[str]: ...
    @property
    def allocated_bytes(self) -> int:
        """
        Bytes of weight buffers allocated so far: only those that added tensors fill (nothing is allocated ahead of the checkpoint).
        """
    @property
    def dtype(self) -> str: ...

class KvCache:
    """
    Paged KV pool [layers, 2, blocks, block_size, kv_heads, hd].
    """
    @staticmethod
    def bytes_per_token(config: ModelConfig) -> int: ...
    @staticmethod
    def checked_bytes(
        config: ModelConfig, num_blocks: typing.Any, block_size: typing.Any = 16
    ) -> int:
        """
        Bytes such a pool takes; raises ValueError naming the field and the limit where the constructor would, without allocating.
        """
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: typing.Any,
        block_size: typing.Any = 16,
        device: str = "cpu",
    ) -> None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...

class LoraAdapter:
    """
    A validated adapter laid out for the forward, in its own storage dtype (float32, float16 or bfloat16; widened to float32 as the kernels read it).
    """
    def __init__(
        self,
        weights: LoraWeights,
        config: LoraConfig,
        model_config: ModelConfig,
        max_lora_rank: typing.Any = 64,
        model: ... = None,
    ) -> None:
        """
        `model` (the LlamaModel it will run on) is needed for DoRA rows: their row norms are taken against its weights.
        """
    @property
    def dtype(self) -> str: ...
    @property
    def max_rank(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """
        Bytes it holds: rank * (in + out) values per adapted module; this is what it costs on the LoRA cache's device level.
        """
    @property
    def vocab_size(self) -> int:
        """
        Its own vocabulary (rows of its embed_tokens / lm_head); 0 when it keeps the model's.
        """

class LlamaModel:
    """
    Llama-family forward over a packed, paged batch.
    """
    @staticmethod
    def workspace_bytes(
        config: ModelConfig, max_num_tokens: typing.Any = 2048, max_lora_rank: typing.Any = 64
    ) -> int:
        """
        Bytes of the workspace such a model allocates; raises ValueError naming the field and the limit where the constructor would, without allocating.
        """
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeightsBuilder,
        max_num_tokens: typing.Any = 2048,
        max_lora_rank: typing.Any = 64,
        device: str = "cpu",
    ) -> None:
        """
        `device`: 'cpu', 'cuda' or 'cuda:N'; the weights are uploaded there once (DeviceError when this build has no CUDA backend or the machine no such GPU).
        """
    @property
    def device(self) -> str: ...
    def forward(
        self,
        token_ids: typing.Any,
        positions: typing.Any,
        seq_starts: typing.Any,
        context_lens: typing.Any,
        block_tables: typing.Any,
        lora_slots: typing.Any,
        logits_indices: typing.Any,
        kv_cache: KvCache,
        adapters: collections.abc.Sequence[LoraAdapter],
        precision: str = "float32",
    ) -> numpy.typing.NDArray[numpy.float32]:
        """
        Run one packed batch at `precision` ('float32' exact, or 'bfloat16'); returns logits [len(logits_indices), W] float32, W the widest vocabulary of the adapters (the model's or an adapter's own); a row's columns past its vocabulary are -inf.
        """
    @property
    def config(self) -> ModelConfig: ...
    @property
    def max_lora_rank(self) -> int: ...
    @property
    def max_num_tokens(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def weight_dtype(self) -> str: ...

class SamplingConfig:
    """
    How a request picks tokens.
    """
    def __init__(
        self,
        top_k: typing.SupportsInt | typing.SupportsIndex = 0,
        top_p: typing.SupportsFloat | typing.SupportsIndex = 1.0,
        temperature: typing.SupportsFloat | typing.SupportsIndex = 1.0,
        seed: typing.SupportsInt | typing.SupportsIndex | None = None,
    ) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def seed(self) -> int | None: ...
    @seed.setter
    def seed(self, arg0: typing.SupportsInt | typing.SupportsIndex | None) -> None: ...
    @property
    def temperature(self) -> float: ...
    @temperature.setter
    def temperature(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    @property
    def top_k(self) -> int: ...
    @top_k.setter
    def top_k(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def top_p(self) -> float: ...
    @top_p.setter
    def top_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None: ...

class InferenceRequest:
    """
    One generation request.
    """

    lora_config: LoraConfig | None
    lora_weights: LoraWeights | None
    return_context_logits: bool
    return_generation_logits: bool
    return_log_probs: bool
    sampling_config: SamplingConfig
    streaming: bool
    def __init__(
        self,
        input_token_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex],
        max_new_tokens: typing.SupportsInt | typing.SupportsIndex = 16,
        sampling_config: SamplingConfig | None = None,
        end_id: typing.SupportsInt | typing.SupportsIndex | None = None,
        stop_token_ids: collections.abc.Sequence[
            collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]
        ] = [],
        lora_task_id: typing.SupportsInt | typing.SupportsIndex | None = None,
        lora_weights: LoraWeights | None = None,
        lora_config: LoraConfig | None = None,
        streaming: bool = False,
        return_context_logits: bool = False,
        return_generation_logits: bool = False,
        return_log_probs: bool = False,
    ) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def end_id(self) -> int | None: ...
    @end_id.setter
    def end_id(self, arg0: typing.SupportsInt | typing.SupportsIndex | None) -> None: ...
    @property
    def input_token_ids(self) -> list[int]: ...
    @input_token_ids.setter
    def input_token_ids(
        self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]
    ) -> None: ...
    @property
    def lora_task_id(self) -> int | None: ...
    @lora_task_id.setter
    def lora_task_id(self, arg0: typing.SupportsInt | typing.SupportsIndex | None) -> None: ...
    @property
    def max_new_tokens(self) -> int: ...
    @max_new_tokens.setter
    def max_new_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def stop_token_ids(self) -> list[list[int]]: ...
    @stop_token_ids.setter
    def stop_token_ids(
        self,
        arg0: collections.abc.Sequence[
            collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]
        ],
    ) -> None: ...

class Response:
    """
    A (partial or final) result of one request.
    """
    def __repr__(self) -> str: ...
    @property
    def context_logits(self) -> typing.Any: ...
    @property
    def error(self) -> typing.Any: ...
    @property
    def error_kind(self) -> typing.Any:
        """
        For an error: 'invalid_request' (the request broke a rule) or 'internal' (the runtime failed); else None.
        """
    @property
    def finish_reason(self) -> typing.Any: ...
    @property
    def generation_logits(self) -> typing.Any: ...
    @property
    def is_final(self) -> bool: ...
    @property
    def log_probs(self) -> typing.Any: ...
    @property
    def output_token_ids(self) -> list[int]: ...
    @property
    def request_id(self) -> int: ...
    @property
    def vocab_size(self) -> int:
        """
        The request's vocabulary (its adapter's when it brings one, else the model's): the width of its logits rows and the bound of its token ids.
        """

class LoraCacheConfig:
    """
    Byte budgets of the two LoRA cache levels.
    """
    def __init__(
        self,
        host_cache_bytes: typing.SupportsInt | typing.SupportsIndex = 1073741824,
        device_cache_bytes: typing.SupportsInt | typing.SupportsIndex = 268435456,
    ) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def device_cache_bytes(self) -> int: ...
    @device_cache_bytes.setter
    def device_cache_bytes(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def host_cache_bytes(self) -> int: ...
    @host_cache_bytes.setter
    def host_cache_bytes(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...

class KvCacheConfig:
    """
    Paged KV pool: block size and capacity.
    """
    def __init__(
        self,
        block_size: typing.SupportsInt | typing.SupportsIndex = 16,
        max_tokens: typing.SupportsInt | typing.SupportsIndex = 16384,
    ) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @block_size.setter
    def block_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def max_tokens(self) -> int: ...
    @max_tokens.setter
    def max_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...

class ExecutorConfig:
    """
    Sizes and limits of an Executor.
    """

    device: str
    dtype: str
    kv_cache: KvCacheConfig
    lora_cache: LoraCacheConfig
    precision: str
    def __init__(
        self,
        device: str = "cpu",
        dtype: str = "auto",
        precision: str = "float32",
        max_batch_size: typing.SupportsInt | typing.SupportsIndex = 8,
        max_num_tokens: typing.SupportsInt | typing.SupportsIndex = 2048,
        max_seq_len: typing.SupportsInt | typing.SupportsIndex | None = None,
        max_lora_rank: typing.SupportsInt | typing.SupportsIndex = 64,
        num_threads: typing.SupportsInt | typing.SupportsIndex | None = None,
        lora_cache: LoraCacheConfig | None = None,
        kv_cache: KvCacheConfig | None = None,
    ) -> None:
        """
        max_seq_len None/0: the model's max_position_embeddings (at most kv_cache.max_tokens); num_threads None/0: the CPUs available to this process (OMP_NUM_THREADS when set).
        """
    def __repr__(self) -> str: ...
    def resolve(self, model_config: ModelConfig) -> ExecutorConfig:
        """
        Check against a model (positions, memory) and return the config an Executor runs with: max_seq_len and num_threads resolved. Allocates nothing.
        """
    def validate(self) -> None:
        """
        Raise ValueError naming the first field outside its limit.
        """
    @property
    def max_batch_size(self) -> int: ...
    @max_batch_size.setter
    def max_batch_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def max_lora_rank(self) -> int: ...
    @max_lora_rank.setter
    def max_lora_rank(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def max_num_tokens(self) -> int: ...
    @max_num_tokens.setter
    def max_num_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def max_seq_len(self) -> int: ...
    @max_seq_len.setter
    def max_seq_len(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    @property
    def num_threads(self) -> int: ...
    @num_threads.setter
    def num_threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None: ...

class Executor:
    """
    In-flight batching loop over one model (C++ thread).
    """
    def __init__(self, model: LlamaModel, config: ExecutorConfig) -> None: ...
    def await_any(
        self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None
    ) -> list[Response]:
        """
        Wait (GIL released, Ctrl-C honoured within 0.1 s) until the shared queue holds responses, then take them all (each with its request_id).
        """
    def await_responses(
        self,
        request_id: typing.SupportsInt | typing.SupportsIndex,
        timeout: typing.SupportsFloat | typing.SupportsIndex | None = None,
    ) -> list[Response]:
        """
        Wait (GIL released, Ctrl-C honoured within 0.1 s) for responses of request_id; timeout None/inf: no deadline, else seconds >= 0.
        """
    def cancel_request(self, request_id: typing.SupportsInt | typing.SupportsIndex) -> None: ...
    def contains_lora_task(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> bool: ...
    def enqueue_request(self, request: InferenceRequest) -> int: ...
    def enqueue_shared(self, request: InferenceRequest) -> int:
        """
        As enqueue_request, but its responses go to the shared queue that await_any reads.
        """
    def lora_task_on_device(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> bool: ...
    def release_request(self, request_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        The caller will not collect request_id's responses: they are dropped and its channel is freed at its final response (does not cancel it; unknown ids are ignored).
        """
    def shutdown(self) -> None: ...
    def stats(self) -> dict: ...
    @property
    def config(self) -> ExecutorConfig:
        """
        The ExecutorConfig it runs with (max_seq_len, num_threads resolved).
        """
    @property
    def model_config(self) -> ModelConfig: ...

def available_cpus() -> int:
    """
    CPUs this process may run on (affinity mask, capped by a cgroup CPU quota): the executor's default thread count.
    """

def build_info() -> dict:
    """
    How this lorart._core was built: {'cuda': bool, 'cuda_archs', 'cuda_runtime', 'cuda_device_count'}.
    """

def get_num_threads() -> int: ...
def host_memory_limit() -> int:
    """
    The most bytes one host allocation of the core may take: physical memory, or the cgroup's memory limit when lower. Larger sizes raise ValueError before allocating.
    """

def lora_modules() -> list:
    """
    The module-id table: [(id, name, hf_name, tp_split, description)] for all 18 ids.
    """

def num_threads() -> int:
    """
    OpenMP threads the calling thread's forward would use (a per-thread setting).
    """

def set_num_threads(threads: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    OpenMP threads of the CPU kernels, for the calling thread (the executor sets its own).
    """

def validate_lora(
    weights: LoraWeights,
    config: LoraConfig,
    model_config: ModelConfig,
    max_lora_rank: typing.SupportsInt | typing.SupportsIndex = 64,
    dtype: str | None = None,
) -> None:
    """
    Raise lorart.LoraError for the first rule the adapter breaks (see DESIGN.md).
    """
