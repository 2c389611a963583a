"""lorart: a multi-LoRA LLM inference runtime (C++ core, thin Python layer).

The compiled core lives in ``lorart._core``; this package re-exports its public types.
"""

# Before the imports below: lorart.cli reads it, and cli is imported by lorart.demo.
__version__ = "0.1.0"

from lorart import hf, lora
from lorart._core import (
    DeviceError,
    ExecutorConfig,
    InferenceRequest,
    KvCacheConfig,
    LoraCacheConfig,
    LoraConfig,
    LoraError,
    LoraWeights,
    ModelConfig,
    Response,
    RopeScaling,
    SamplingConfig,
    build_info,
)
from lorart.executor import Executor
from lorart.llm import LLM, GenerationOutput
from lorart.lora import LORA_MODULES, LoraModule

__all__ = [
    "LLM",
    "LORA_MODULES",
    "DeviceError",
    "Executor",
    "ExecutorConfig",
    "GenerationOutput",
    "InferenceRequest",
    "KvCacheConfig",
    "LoraCacheConfig",
    "LoraConfig",
    "LoraError",
    "LoraModule",
    "LoraWeights",
    "ModelConfig",
    "Response",
    "RopeScaling",
    "SamplingConfig",
    "__version__",
    "build_info",
    "hf",
    "lora",
]
