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


# --------------------------------------------------------------------- byte order, alignment


@pytest.mark.parametrize("dtype", [">f4", ">f2"])
def test_big_endian_weights_keep_their_values(dtype):
    values = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 4
    weights = lorart.LoraWeights(values.astype(dtype))  # before: bytes read as little-endian
    assert weights.dtype == ("float32" if dtype == ">f4" else "float16")
    np.testing.assert_array_equal(weights.numpy(), values)


@pytest.mark.parametrize("dtype", [">i4", ">i8"])
def test_big_endian_config_keeps_its_values(dtype):
    table = np.array([[1, 0, 8], [7, 2, 16]])
    if dtype == ">i8":
        with pytest.raises(ValueError, match="lora_config must have dtype int32, got int64"):
            lorart.LoraConfig(table.astype(dtype))
        return
    config = lorart.LoraConfig(table.astype(dtype))
    np.testing.assert_array_equal(config.numpy(), table)
    assert config.numpy().dtype == np.int32 and config.numpy().dtype.isnative


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_misaligned_arrays_are_copied_to_aligned_memory(dtype):
    values = np.arange(8, dtype=np.float32).astype(dtype).reshape(2, 4)
    raw = bytearray(values.nbytes + 1)
    misaligned = np.frombuffer(raw, dtype=dtype, offset=1).reshape(2, 4)
    misaligned.flags.writeable = False
    raw[1:] = values.tobytes()
    assert not misaligned.flags.aligned
    weights = lorart.LoraWeights(misaligned)
    view = weights.numpy()
    assert view.ctypes.data % np.dtype(dtype).alignment == 0
    assert not np.shares_memory(view, misaligned)
    np.testing.assert_array_equal(view.astype(np.float32), values.astype(np.float32))


def test_misaligned_config_is_copied():
    table = np.array([[1, 0, 8]], dtype=np.int32)
    raw = bytearray(1) + bytearray(table.tobytes())
    config = lorart.LoraConfig(np.frombuffer(raw, dtype=np.int32, offset=1).reshape(1, 3))
    assert config.numpy().ctypes.data % 4 == 0
    np.testing.assert_array_equal(config.numpy(), table)


def test_c_contiguous_with_odd_unit_strides_is_borrowed():
    # numpy leaves the stride of an extent-1 dim arbitrary: still contiguous, still no copy.
    base = np.arange(8, dtype=np.float32)
    odd = np.lib.stride_tricks.as_strided(base, shape=(1, 8), strides=(3, 4))
    assert odd.flags.c_contiguous
    weights = lorart.LoraWeights(odd)
    assert np.shares_memory(weights.numpy(), base)
    np.testing.assert_array_equal(weights.numpy(), base[None])


def test_torch_misaligned_tensor_is_copied():
    values = torch.arange(6, dtype=torch.float32)
    raw = bytearray(1) + bytearray(values.numpy().tobytes())
    tensor = torch.frombuffer(raw, dtype=torch.float32, offset=1).reshape(2, 3)
    assert tensor.data_ptr() % 4 != 0
    weights = lorart.LoraWeights(tensor)
    assert weights.numpy().ctypes.data % 4 == 0
    np.testing.assert_array_equal(weights.numpy(), values.reshape(2, 3).numpy())


class DlpackOnly:
    """A DLPack producer without torch's is_contiguous(): strides arrive as they are."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@pytest.mark.parametrize(
    "view",
    [lambda a: a[:, ::2], lambda a: a[::-1], lambda a: a.T, lambda a: a[1:3]],
    ids=["step", "reversed", "transposed", "rows"],
)
def test_dlpack_strided_views_are_made_compact(view):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    weights = lorart.LoraWeights(DlpackOnly(view(base)))
    np.testing.assert_array_equal(weights.numpy(), view(base))


@pytest.mark.parametrize(
    "bad,match",
    [
        ([[1.5, 0, 1]], "lora_config must hold integers, got values of dtype float64"),
        ([[2**40, 0, 1]], "lora_config holds 1099511627776, outside int32"),
        ([[2**70, 0, 1]], "lora_config must hold integers, got values of dtype object"),
        ([["1", 0, 1]], "lora_config must hold integers"),
        ([[1, 0], [1]], "lora_config: cannot read <class 'list'> as an array"),
        (object(), "lora_config must hold integers, got values of dtype object"),
    ],
)
def test_lists_are_checked_before_the_cast(bad, match):
    # before: np.asarray(x, int32) truncated 1.5 to 1, and 2**40 raised OverflowError
    with pytest.raises(ValueError, match=match):
        lorart.LoraConfig(bad)


def test_repr_shows_shape_and_dtype():
    assert (
        repr(lorart.LoraConfig([[1, 0, 8], [2, 0, 8]])) == "LoraConfig(shape=[2, 3], dtype=int32)"
    )
    weights = lorart.LoraWeights(np.zeros((1, 2, 5), np.float16))
    assert repr(weights) == "LoraWeights(shape=[2, 5], dtype=float16)"


def test_big_endian_and_misaligned_model_inputs(gqa_llama_dir, lorart_model):
    """Checkpoint weights and forward index arrays cross the same interop: byte order and
    alignment must not change the logits."""
    import lorart._core as core
    from lorart import hf

    model = lorart_model(gqa_llama_dir)
    config = model.config

    def build(convert):
        builder = core.ModelWeightsBuilder(config)
        for name, array in hf.iter_weights(gqa_llama_dir, config):
            builder.add(name, convert(np.asarray(array)))
        return core.LlamaModel(config, builder, 64, 8)

    def misalign(a):
        raw = bytearray(a.nbytes + 1)
        out = np.frombuffer(raw, dtype=a.dtype, offset=1).reshape(a.shape)
        raw[1:] = a.tobytes()
        return out

    def run(m, convert):
        cache = core.KvCache(config, 4, 16)
        args = [
            np.array([5, 17, 42, 99], np.int32),  # token_ids
            np.array([0, 1, 2, 3], np.int32),  # positions
            np.array([0, 4], np.int32),  # seq_starts
            np.array([0], np.int32),  # context_lens
            np.array([[0]], np.int32),  # block_tables
            np.array([-1], np.int32),  # lora_slots
            np.array([0, 1, 2, 3], np.int32),  # logits_indices
        ]
        return m.forward(*[convert(a) for a in args], cache, [])

    native = run(build(lambda a: a), lambda a: a)
    swapped = run(build(lambda a: a.astype(a.dtype.newbyteorder(">"))), lambda a: a.astype(">i4"))
    np.testing.assert_array_equal(swapped, native)
    np.testing.assert_array_equal(run(build(misalign), misalign), native)


def test_a_broadcast_view_too_big_to_copy_is_refused_by_name():
    """A strided view is copied once; a broadcast one of a few bytes can stand for a petabyte
    (numpy raised MemoryError). The copy is checked against the machine's memory first."""
    huge = np.broadcast_to(np.float32(0), (2**24, 2**24))
    with pytest.raises(ValueError, match="cannot allocate lora_weights: 1125899906842624 bytes"):
        lorart.LoraWeights(huge)
