#include "lora/lora_validation.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/errors.h"
#include "lora/lora_tensors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 64, intermediate 128, q 4x16 = 64, kv 2x16 = 32, 3 layers.
// The LoRA layer sees a model only as a LoraTarget (what ModelConfig::lora_target() builds).
LoraTarget small_llama() {
  return testing_util::llama_config(100, 64, 128, 3, 4, 2, 16).lora_target();
}

constexpr int64_t kRowSize = 260;
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows needing 2*(64+64) = 256, 1*(64+32) = 96 and 1*(128+64) = 192 values.
const std::vector<LoraConfigRow> kValidRows = {{1, 0, 2}, {2, 1, 1}, {6, 2, 1}};

// Finite, exactly representable in fp16 and bf16, with `patch` applied on top.
LoraWeights make_weights(int64_t rows, int64_t row_size,
                         const std::vector<std::pair<int64_t, float>>& patch = {}) {
  std::vector<float> values(rows * row_size);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 16) * 0.125f - 1;
  for (const auto& [index, value] : patch) values[index] = value;
  return LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {rows, row_size}));
}

void expect_lora_error(const LoraWeights* weights, const LoraConfig* config,
                       const std::string& needle, const LoraLimits& limits = {}) {
  SCOPED_TRACE(needle);
  expect_error<LoraError>([&] { validate_lora(weights, config, small_llama(), limits); }, needle);
}

// Validates `rows` against weights shaped for them.
void expect_rejected(const std::vector<LoraConfigRow>& rows, const std::string& needle,
                     const LoraLimits& limits = {}) {
  const LoraConfig config = LoraConfig::from_rows(rows);
  const LoraWeights weights = make_weights(config.num_rows(), kRowSize);
  expect_lora_error(&weights, &config, needle, limits);
}

TEST(LoraValidationTest, ValidAdapterPasses) {
  const LoraTarget model = small_llama();
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights weights = make_weights(3, kRowSize);
  EXPECT_NO_THROW(validate_lora(&weights, &config, model, LoraLimits{}));
  EXPECT_NO_THROW(validate_lora(&weights, &config, model, LoraLimits{2, DType::kFloat32}));

  const LoraWeights half = weights.to(DType::kFloat16);
  EXPECT_NO_THROW(validate_lora(&half, &config, model, LoraLimits{}));
  EXPECT_NO_THROW(validate_lora(&half, &config, model, LoraLimits{64, DType::kFloat16}));

  // Rows exactly as long as the largest adapter need no padding.
  const LoraWeights tight = make_weights(3, 256);
  EXPECT_NO_THROW(validate_lora(&tight, &config, model, LoraLimits{}));
}

TEST(LoraValidationTest, RowValuesAreRankTimesInPlusOut) {
  const LoraTarget model = small_llama();
  EXPECT_EQ(lora_row_values(model, {1, 0, 2}), 256);
  EXPECT_EQ(lora_row_values(model, {2, 1, 1}), 96);
  EXPECT_EQ(lora_row_values(model, {6, 2, 1}), 192);
  EXPECT_EQ(lora_row_values(model, {0, 0, 8}), 8 * (64 + 128));
}

TEST(LoraValidationTest, MissingWeightsOrConfig) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights weights = make_weights(3, kRowSize);
  expect_lora_error(
      nullptr, &config,
      "lora_weights is missing: a LoRA adapter needs both lora_weights and lora_config");
  expect_lora_error(&weights, nullptr, "lora_config is missing");
  expect_lora_error(nullptr, nullptr, "lora_weights is missing");
}

TEST(LoraValidationTest, RowCountsMustAgree) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights weights = make_weights(2, kRowSize);
  expect_lora_error(
      &weights, &config,
      "lora_weights has 2 rows but lora_config has 3; they must describe the same rows");
}

TEST(LoraValidationTest, AdapterNeedsAtLeastOneRow) {
  const LoraConfig config = LoraConfig::from_rows({});
  const LoraWeights weights = make_weights(0, kRowSize);
  expect_lora_error(&weights, &config,
                    "lora_config has no rows: a LoRA adapter adapts at least one");
}

TEST(LoraValidationTest, ModuleIdMustBeKnownAndInTheModel) {
  expect_rejected({{1, 0, 2}, {42, 0, 1}},
                  "lora_config row 1: module_id 42 is unknown (valid ids are 0..17)");
  expect_rejected({{-1, 0, 1}}, "module_id -1 is unknown");
  expect_rejected({{9, 0, 1}},
                  "lora_config row 0: module_id 9 (cross_attn_q) is not a LoRA module of "
                  "LlamaForCausalLM (supported: attn_qkv, attn_q, attn_k, attn_v, attn_dense, "
                  "mlp_h_to_4h, mlp_4h_to_h, mlp_gate)");
  expect_rejected({{16, 0, 1}}, "module_id 16 (moe_router) is not a LoRA module");
}

TEST(LoraValidationTest, LayerIndexMustBeInRange) {
  expect_rejected({{1, -1, 1}},
                  "lora_config row 0: layer_idx -1 is out of range [0, 3) (num_layers = 3)");
  expect_rejected({{1, 0, 1}, {1, 3, 1}}, "lora_config row 1: layer_idx 3 is out of range [0, 3)");
}

TEST(LoraValidationTest, AdapterSizeMustBeInOneToMaxRank) {
  expect_rejected({{1, 0, 0}},
                  "lora_config row 0: adapter_size 0 must be in [1, max_lora_rank = 64]");
  expect_rejected({{1, 0, -2}}, "adapter_size -2 must be in [1, max_lora_rank = 64]");
  expect_rejected({{1, 0, 3}},
                  "lora_config row 0: adapter_size 3 must be in [1, max_lora_rank = 2]",
                  LoraLimits{2, std::nullopt});
  // The limit itself is allowed.
  const LoraConfig config = LoraConfig::from_rows({{1, 0, 2}});
  const LoraWeights weights = make_weights(1, kRowSize);
  EXPECT_NO_THROW(validate_lora(&weights, &config, small_llama(), LoraLimits{2, std::nullopt}));
}

TEST(LoraValidationTest, ModuleAndLayerPairMayAppearOnce) {
  expect_rejected({{1, 0, 1}, {2, 0, 1}, {1, 0, 2}},
                  "lora_config rows 0 and 2 both adapt attn_q of layer 0; each (module, layer) "
                  "may appear once");
  // Same module on another layer, or another module on the same layer, is fine.
  const LoraConfig config = LoraConfig::from_rows({{1, 0, 1}, {1, 1, 1}, {2, 0, 1}});
  const LoraWeights weights = make_weights(3, kRowSize);
  EXPECT_NO_THROW(validate_lora(&weights, &config, small_llama(), {}));
}

TEST(LoraValidationTest, RowMustHoldTheWholeAdapter) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights weights = make_weights(3, 255);
  expect_lora_error(&weights, &config,
                    "lora_weights row 0 (attn_q, layer 0): adapter_size 2 needs 256 values "
                    "(2*64 in + 64*2 out) but rows hold 255");
  const LoraConfig down = LoraConfig::from_rows({{6, 1, 1}});
  const LoraWeights short_row = make_weights(1, 191);
  expect_lora_error(&short_row, &down,
                    "(mlp_4h_to_h, layer 1): adapter_size 1 needs 192 values (1*128 in + "
                    "64*1 out) but rows hold 191");
}

TEST(LoraValidationTest, DtypeMustMatchTheModel) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights half = make_weights(3, kRowSize).to(DType::kFloat16);
  expect_lora_error(
      &half, &config,
      "lora_weights dtype float16 does not match the model dtype float32; convert the adapter to "
      "float32 first",
      LoraLimits{64, DType::kFloat32});
  const LoraWeights bf16 = make_weights(3, kRowSize).to(DType::kBFloat16);
  expect_lora_error(&bf16, &config,
                    "lora_weights dtype bfloat16 does not match the model dtype float16",
                    LoraLimits{64, DType::kFloat16});
}

TEST(LoraValidationTest, UsedValuesMustBeFinite) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights nan_first = make_weights(3, kRowSize, {{5, kNan}});
  expect_lora_error(&nan_first, &config,
                    "lora_weights row 0 (attn_q, layer 0): value at column 5 is nan; LoRA "
                    "weights must be finite");
  // Row 1 (attn_k, r = 1) uses columns [0, 96): 95 is its last used value.
  const LoraWeights inf_last = make_weights(3, kRowSize, {{kRowSize + 95, kInf}});
  expect_lora_error(&inf_last, &config,
                    "lora_weights row 1 (attn_k, layer 1): value at column 95 is inf");
  const LoraWeights minus_inf = make_weights(3, kRowSize, {{2 * kRowSize, -kInf}});
  expect_lora_error(&minus_inf, &config, "row 2 (mlp_4h_to_h, layer 2): value at column 0 is inf");
  // Checked after conversion too: fp16 and bf16 keep inf and nan.
  const LoraWeights half_nan = nan_first.to(DType::kFloat16);
  expect_lora_error(&half_nan, &config, "value at column 5 is nan");
  const LoraWeights bf16_inf = inf_last.to(DType::kBFloat16);
  expect_lora_error(&bf16_inf, &config, "value at column 95 is inf");
}

TEST(LoraValidationTest, NonFiniteValuesInThePaddingAreAccepted) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights padded =
      make_weights(3, kRowSize, {{256, kNan}, {kRowSize + 96, kNan}, {2 * kRowSize + 259, kInf}});
  EXPECT_NO_THROW(validate_lora(&padded, &config, small_llama(), {}));
}

TEST(LoraTensorsTest, ConfigFromRowsAndThreeDimForm) {
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  EXPECT_EQ(config.num_rows(), 3);
  EXPECT_NE(config.owner(), nullptr);
  EXPECT_EQ(config.tensor().dtype(), DType::kInt32);
  EXPECT_EQ(config.row(2).module_id, 6);
  EXPECT_EQ(config.row(2).layer_idx, 2);
  EXPECT_EQ(config.row(2).adapter_size, 1);
  expect_error<InvalidArgument>([&] { config.row(3); }, "lora_config row 3 out of range [0, 3)");

  std::vector<int32_t> table = {1, 0, 2, 2, 1, 1};
  const LoraConfig batched(Tensor(table.data(), DType::kInt32, {1, 2, 3}), nullptr);
  EXPECT_EQ(batched.tensor().dim(), 2);
  EXPECT_EQ(batched.tensor().shape_str(), "[2, 3]");
  EXPECT_EQ(batched.tensor().data(), table.data());  // a view, not a copy
  EXPECT_EQ(batched.row(1).module_id, 2);
}

TEST(LoraTensorsTest, ConfigRejectsBadForms) {
  std::vector<int32_t> table(12);
  auto make = [&](Tensor t) { return [t] { LoraConfig(t, nullptr); }; };
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt32, {2, 1, 3})),
                          "lora_config must be [rows, 3] or [1, rows, 3]; got [2, 1, 3] (the "
                          "leading dim of the 3-D form must be 1)");
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt32, {3})),
                          "lora_config must be [rows, 3] or [1, rows, 3]; got [3]");
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt64, {2, 3})),
                          "lora_config must have dtype int32, got int64");
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt32, {2, 5})),
                          "lora_config must have 3 columns [module_id, layer_idx, adapter_size] "
                          "or 4 (is_dora appended), got 5 (shape [2, 5])");
  EXPECT_EQ(LoraConfig(Tensor(table.data(), DType::kInt32, {3, 4}), nullptr).num_columns(), 4);
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt32, {2, 3}, Device::cuda())),
                          "lora_config must be in host memory, got a tensor on cuda:0");
  const int64_t shape[2] = {2, 3};
  const int64_t strides[2] = {1, 2};
  expect_error<LoraError>(make(Tensor(table.data(), DType::kInt32, 2, shape, strides)),
                          "lora_config must be contiguous (row-major)");
}

TEST(LoraTensorsTest, WeightsCopyOfAcceptsThreeDimAndOwnsItsCopy) {
  std::vector<float> values = {1, 2, 3, 4, 5, 6, 7, 8};
  const LoraWeights weights =
      LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {1, 2, 4}));
  values[5] = 100;
  EXPECT_EQ(weights.tensor().shape_str(), "[2, 4]");
  EXPECT_EQ(weights.num_rows(), 2);
  EXPECT_EQ(weights.row_size(), 4);
  EXPECT_EQ(weights.nbytes(), 32u);
  EXPECT_NE(weights.owner(), nullptr);
  EXPECT_NE(weights.tensor().data(), values.data());
  EXPECT_EQ(weights.value(1, 1), 6.0f);
  EXPECT_EQ(weights.value(0, 3), 4.0f);

  auto make = [&](Tensor t) { return [t] { LoraWeights::copy_of(t); }; };
  expect_error<LoraError>(make(Tensor(values.data(), DType::kFloat32, {2, 1, 4})),
                          "lora_weights must be [rows, max_row] or [1, rows, max_row]; got [2, 1, "
                          "4] (the leading dim of the 3-D form must be 1)");
  expect_error<LoraError>(make(Tensor(values.data(), DType::kInt32, {2, 4})),
                          "lora_weights must have dtype float32, float16 or bfloat16, got int32");
}

TEST(LoraTensorsTest, WeightsConvertBetweenFloatDtypes) {
  std::vector<float> values = {1.0f, -0.5f, 0x1p-24f, 65504.0f, 1.0f + 0x1p-8f, 3.0f};
  const LoraWeights weights = LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {2, 3}));
  const LoraWeights half = weights.to(DType::kFloat16);
  EXPECT_EQ(half.dtype(), DType::kFloat16);
  EXPECT_EQ(half.nbytes(), 12u);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(half.value(i / 3, i % 3), values[i]) << i;
  const LoraWeights back = half.to(DType::kFloat32);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(back.value(i / 3, i % 3), values[i]) << i;

  const LoraWeights bf16 = weights.to(DType::kBFloat16);
  EXPECT_EQ(bf16.value(1, 1), 1.0f);  // 1 + 2^-8 ties to even
  EXPECT_EQ(bf16.value(1, 2), 3.0f);
  expect_error<LoraError>([&] { weights.to(DType::kInt32); },
                          "lora_weights can only be converted to float32, float16 or bfloat16, "
                          "not int32");
}

}  // namespace
}  // namespace lorart
