"""Arrays across the binding (numpy, DLPack), dtype conversion, error types, build info."""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest
import torch

import lorart


def test_numpy_is_borrowed_not_copied():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    weights = lorart.LoraWeights(values)
    view = weights.numpy()
    assert np.shares_memory(view, values)
    assert not view.flags.writeable
    assert weights.shape == (3, 4) and weights.dtype == "float32"


def test_three_d_form_is_viewed_as_two_d():
    values = np.arange(24, dtype=np.float16).reshape(1, 4, 6)
    weights = lorart.LoraWeights(values)
    assert weights.shape == (4, 6)
    assert np.shares_memory(weights.numpy(), values)
    np.testing.assert_array_equal(weights.numpy(), values[0])
    config = lorart.LoraConfig(np.array([[[1, 0, 2], [2, 1, 4]]], dtype=np.int32))
    assert config.shape == (2, 3)


def test_borrowed_memory_outlives_the_caller_reference():
    weights = lorart.LoraWeights(np.full((2, 5), 7.0, dtype=np.float32))
    gc.collect()
    np.testing.assert_array_equal(weights.numpy(), np.full((2, 5), 7.0))


def test_non_contiguous_numpy_is_copied_with_the_right_values():
    values = np.arange(12, dtype=np.float32).reshape(4, 3).T  # [3, 4], column-major
    weights = lorart.LoraWeights(values)
    np.testing.assert_array_equal(weights.numpy(), values)
    assert not np.shares_memory(weights.numpy(), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_tensors_cross_by_dlpack_without_copy(dtype):
    tensor = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    weights = lorart.LoraWeights(tensor)
    assert weights.dtype == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(weights.numpy().astype(np.float32), tensor.float().numpy())
    assert weights.numpy().ctypes.data == tensor.data_ptr()


def test_torch_non_contiguous_and_int_config():
    tensor = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()
    np.testing.assert_array_equal(lorart.LoraWeights(tensor).numpy(), tensor.numpy())
    config = lorart.LoraConfig(torch.tensor([[1, 0, 2]], dtype=torch.int32))
    np.testing.assert_array_equal(config.numpy(), [[1, 0, 2]])


def test_nested_lists():
    config = lorart.LoraConfig([[1, 0, 2], [7, 1, 4]])
    assert config.numpy().dtype == np.int32 and len(config) == 2
    weights = lorart.LoraWeights([[0.5, 1.5]])
    assert weights.dtype == "float32"


def test_conversion_matches_numpy_rounding():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(4000).astype(np.float32),
            np.float32([0.0, -0.0, 65504, 65519.9, 65520, 1e-8, 6e-8, 3e-5, 1e30, np.inf, -np.inf]),
            (rng.standard_normal(1000) * 1e-6).astype(np.float32),  # fp16 subnormals
        ]
    )[None]
    weights = lorart.LoraWeights(values)
    with np.errstate(over="ignore"):
        expected16 = values.astype(np.float16)
    np.testing.assert_array_equal(weights.to("float16").numpy(), expected16)
    np.testing.assert_array_equal(
        weights.to("bfloat16").numpy().view(np.uint16),
        values.astype(ml_dtypes.bfloat16).view(np.uint16),
    )
    back = weights.to("bfloat16").to("float32").numpy()
    np.testing.assert_array_equal(back, values.astype(ml_dtypes.bfloat16).astype(np.float32))
    nan = lorart.LoraWeights(np.float32([[np.nan]])).to("float16").numpy()
    assert np.isnan(nan).all()


def test_error_types():
    assert issubclass(lorart.LoraError, ValueError)
    assert issubclass(lorart.DeviceError, RuntimeError)
    config = lorart.ModelConfig()
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype must be one of float32"):
        config.dtype = "int8"
    config.architecture = "GPT2LMHeadModel"
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' is not supported"):
        config.validate()
    with pytest.raises(ValueError, match=r"lora_weights has unsupported dtype uint8 \(supported"):
        lorart.LoraWeights(np.zeros((1, 2), dtype=np.uint8))


def test_build_info_reports_the_backend():
    info = lorart.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["cuda_device_count"] >= 0
    if info["cuda"]:
        assert info["cuda_archs"] == "90"
        assert info["cuda_runtime"].count(".") == 1


def test_module_table_is_complete():
    assert sorted(lorart.LORA_MODULES) == list(range(18))
    assert lorart.LORA_MODULES[5].name == "mlp_h_to_4h"
    assert lorart.LORA_MODULES[5].hf_name == "gate_proj"
    assert lorart.LORA_MODULES[7].hf_name == "up_proj"
    assert lorart.LORA_MODULES[17].name == "mlp_router"
    assert {m.tp_split for m in lorart.LORA_MODULES.values()} == {"column", "row", "replicated"}
    assert lorart.lora.module_id("attn_dense") == lorart.lora.module_id("o_proj") == 4
