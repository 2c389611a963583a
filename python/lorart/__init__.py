"""lorart: a multi-LoRA LLM inference runtime (C++ core, thin Python layer).

The compiled core lives in ``lorart._core``; this package re-exports its public types.
"""

import os

# libgomp's threads spin ~300,000 times (about 0.1-1 ms) before they sleep between parallel
# regions; on a machine whose cores other processes use, the spinning burns their CPU time and
# a descheduled thread stalls every barrier of the step. A short spin keeps back-to-back regions
# of one step fast and yields the cores soon after (benchmarks/shared_machine.py: faster alone
# and beside busy neighbours). libgomp reads this once, when lorart._core first loads it, so it
# is set here, before that import, and only when the user has chosen neither setting.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

# Before the imports below: lorart.cli reads it, and cli is imported by lorart.demo.
__version__ = "0.1.0"

from lorart import hf, lora  # after the OpenMP setting above
from lorart._core import (
    DeviceError,
    ExecutorConfig,
    InferenceRequest,
    KvCacheConfig,
    LoraCacheConfig,
    LoraConfig,
    LoraEmbeddings,
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
    "LoraEmbeddings",
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
