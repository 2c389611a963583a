#include "lora/lora_validation.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <limits>
#include <memory>
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

// --- DoRA rows (TensorRT-LLM's 4th column) -------------------------------------------------------

TEST(LoraValidationTest, IsDoraMustBeZeroOrOne) {
  expect_rejected({{1, 0, 2, 2}}, "lora_config row 0: is_dora 2 must be 0 or 1");
  expect_rejected({{1, 0, 1, 0}, {2, 0, 1, -1}}, "lora_config row 1: is_dora -1 must be 0 or 1");
  const LoraConfig config = LoraConfig::from_rows({{1, 0, 2, 1}, {2, 1, 1, 0}});
  const LoraWeights weights = make_weights(2, 320);
  EXPECT_NO_THROW(validate_lora(&weights, &config, small_llama(), {}));
}

// A DoRA row appends Ho magnitudes: attn_q rank 2 needs 2*64 + 64*2 + 64 = 320 values.
TEST(LoraValidationTest, DoraRowMustHoldItsMagnitudes) {
  const LoraTarget model = small_llama();
  EXPECT_EQ(lora_row_values(model, {1, 0, 2, 1}), 320);
  EXPECT_EQ(lora_row_values(model, {6, 0, 1, 1}), 192 + 64);  // mlp_4h_to_h: Ho = hidden
  EXPECT_EQ(lora_row_values(model, {2, 0, 1, 1}), 96 + 32);   // attn_k: Ho = kv
  const LoraConfig config = LoraConfig::from_rows({{1, 0, 2, 1}});
  const LoraWeights short_row = make_weights(1, 319);
  expect_lora_error(&short_row, &config,
                    "lora_weights row 0 (attn_q, layer 0): adapter_size 2 needs 320 values (2*64 "
                    "in + 64*2 out + 64 magnitudes) but rows hold 319");
  // The same row without DoRA fits in 256.
  const LoraConfig plain = LoraConfig::from_rows({{1, 0, 2, 0}});
  const LoraWeights plain_row = make_weights(1, 256);
  EXPECT_NO_THROW(validate_lora(&plain_row, &plain, model, {}));
}

TEST(LoraValidationTest, DoraMagnitudesMustBeFinite) {
  const LoraConfig config = LoraConfig::from_rows({{1, 0, 2, 1}});
  const LoraWeights nan_magnitude = make_weights(1, kRowSize + 64, {{319, kNan}});
  expect_lora_error(&nan_magnitude, &config,
                    "lora_weights row 0 (attn_q, layer 0): value at column 319 is nan; LoRA "
                    "weights must be finite");
  const LoraWeights inf_first = make_weights(1, kRowSize + 64, {{256, kInf}});
  expect_lora_error(&inf_first, &config, "value at column 256 is inf");
  // Past the magnitudes is padding.
  const LoraWeights padded = make_weights(1, kRowSize + 64, {{320, kNan}});
  EXPECT_NO_THROW(validate_lora(&padded, &config, small_llama(), {}));
  // Without DoRA, column 256 is padding too.
  const LoraConfig plain = LoraConfig::from_rows({{1, 0, 2}});
  EXPECT_NO_THROW(validate_lora(&inf_first, &plain, small_llama(), {}));
}

TEST(LoraTensorsTest, ConfigHasAFourthColumnOnlyWithDoraRows) {
  const LoraConfig plain = LoraConfig::from_rows({{1, 0, 2}, {2, 1, 1, 0}});
  EXPECT_EQ(plain.num_columns(), 3);
  EXPECT_EQ(plain.row(1).is_dora, 0);
  const LoraConfig dora = LoraConfig::from_rows({{1, 0, 2}, {2, 1, 1, 1}});
  ASSERT_EQ(dora.num_columns(), 4);
  EXPECT_EQ(dora.tensor().shape_str(), "[2, 4]");
  EXPECT_EQ(dora.row(0).is_dora, 0);
  EXPECT_EQ(dora.row(1).is_dora, 1);
  EXPECT_EQ(dora.row(1).module_id, 2);
  EXPECT_EQ(dora.row(1).adapter_size, 1);
  // TensorRT-LLM's 3-D form, and an owning copy, keep the 4 columns.
  std::vector<int32_t> table = {1, 0, 2, 1, 6, 2, 4, 0};
  const LoraConfig batched(Tensor(table.data(), DType::kInt32, {1, 2, 4}), nullptr);
  EXPECT_EQ(batched.tensor().shape_str(), "[2, 4]");
  EXPECT_EQ(batched.row(0).is_dora, 1);
  EXPECT_EQ(batched.row(1).layer_idx, 2);
  EXPECT_EQ(batched.row(1).adapter_size, 4);
  const LoraConfig copy = LoraConfig::copy_of(Tensor(table.data(), DType::kInt32, {2, 4}));
  table[3] = 0;
  EXPECT_EQ(copy.num_columns(), 4);
  EXPECT_EQ(copy.row(0).is_dora, 1);
  EXPECT_EQ(copy.row(1).module_id, 6);
}

// --- Embedding-side parts ------------------------------------------------------------------------

using P = LoraEmbeddings;
using Parts = std::array<P::Input, P::kNumParts>;

// A [rows, cols] float32 part of finite values, with `patch` applied on top.
P::Input emb_part(int64_t rows, int64_t cols,
                  const std::vector<std::pair<int64_t, float>>& patch = {}) {
  auto values = std::make_shared<std::vector<float>>(rows * cols);
  for (size_t i = 0; i < values->size(); ++i) (*values)[i] = static_cast<float>(i % 7) * 0.25f;
  for (const auto& [index, value] : patch) (*values)[index] = value;
  return {Tensor(values->data(), DType::kFloat32, {rows, cols}), values};
}

// Zero rows and `parts`: an adapter made of embedding-side parts only.
struct PartsOnly {
  LoraWeights weights;
  LoraConfig config;
};
PartsOnly parts_only(const Parts& parts) {
  return {LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(parts)),
          LoraConfig::from_rows({})};
}

void expect_parts_error(const Parts& parts, const std::string& needle,
                        const LoraLimits& limits = {}) {
  SCOPED_TRACE(needle);
  const PartsOnly a = parts_only(parts);
  expect_lora_error(&a.weights, &a.config, needle, limits);
  // The same rule applies to validate_lora_embeddings called alone.
  if (a.weights.embeddings() == nullptr) return;  // no parts: nothing for it to check
  expect_error<LoraError>(
      [&] { validate_lora_embeddings(*a.weights.embeddings(), small_llama(), limits); }, needle);
}

void expect_parts_ok(const Parts& parts, const LoraLimits& limits = {}) {
  const PartsOnly a = parts_only(parts);
  EXPECT_NO_THROW(validate_lora(&a.weights, &a.config, small_llama(), limits));
}

TEST(LoraValidationTest, ZeroRowsNeedEmbeddingSideParts) {
  Parts parts;
  parts[P::kEmbedTokens] = emb_part(100, 64);
  expect_parts_ok(parts);
  // An empty LoraEmbeddings is no parts: zero rows are an error again.
  expect_parts_error(Parts{},
                     "lora_config has no rows: a LoRA adapter adapts at least one "
                     "(module, layer) or brings embedding-side parts");
  // Parts beside rows are validated too.
  Parts bad;
  bad[P::kLmHead] = emb_part(100, 63);
  const LoraConfig config = LoraConfig::from_rows(kValidRows);
  const LoraWeights rows = make_weights(3, kRowSize);
  const LoraWeights with_parts(rows.tensor(), rows.owner(),
                               std::make_shared<const LoraEmbeddings>(bad));
  expect_lora_error(&with_parts, &config, "lm_head must be [V, hidden_size]");
}

TEST(LoraValidationTest, TablesMustBeVByHiddenWithOneV) {
  Parts cols;
  cols[P::kEmbedTokens] = emb_part(100, 63);
  expect_parts_error(cols,
                     "embed_tokens must be [V, hidden_size] (any x 64 for this model), got "
                     "[100, 63]");
  Parts head_cols;
  head_cols[P::kLmHead] = emb_part(100, 65);
  expect_parts_error(head_cols,
                     "lm_head must be [V, hidden_size] (any x 64 for this model), got [100, 65]");
  Parts disagree;
  disagree[P::kEmbedTokens] = emb_part(120, 64);
  disagree[P::kLmHead] = emb_part(110, 64);
  expect_parts_error(disagree,
                     "lm_head must be [V, hidden_size] (120 x 64 for this model), got [110, 64]");
  Parts both;
  both[P::kEmbedTokens] = emb_part(120, 64);
  both[P::kLmHead] = emb_part(120, 64);
  expect_parts_ok(both);
  // The base vocabulary with one table: the adapter unties or replaces just that table.
  Parts embed_only;
  embed_only[P::kEmbedTokens] = emb_part(100, 64);
  expect_parts_ok(embed_only);
  Parts head_only;
  head_only[P::kLmHead] = emb_part(100, 64);
  expect_parts_ok(head_only);
}

TEST(LoraValidationTest, VocabularyIsAtLeastTheBaseAndAtMostTheLimit) {
  Parts smaller;
  smaller[P::kEmbedTokens] = emb_part(99, 64);
  smaller[P::kLmHead] = emb_part(99, 64);
  expect_parts_error(smaller,
                     "embed_tokens has 99 rows (the adapter's vocabulary); it must be in [the "
                     "base vocab_size = 100, 16777216]");
  Parts smaller_head;
  smaller_head[P::kLmHead] = emb_part(99, 64);
  expect_parts_error(smaller_head, "lm_head has 99 rows (the adapter's vocabulary)");

  // At and past kMaxLoraVocabSize, on a model of hidden size 1 (a tied table of bf16 zeros).
  LoraTarget narrow = small_llama();
  narrow.hidden_size = 1;
  for (const int64_t v : {kMaxLoraVocabSize, kMaxLoraVocabSize + 1}) {
    auto values = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(v), 0);
    Parts parts;
    parts[P::kEmbedTokens] = {Tensor(values->data(), DType::kBFloat16, {v, 1}), values};
    parts[P::kLmHead] = parts[P::kEmbedTokens];
    const LoraEmbeddings e(parts);
    if (v == kMaxLoraVocabSize) {
      EXPECT_NO_THROW(validate_lora_embeddings(e, narrow, {}));
    } else {
      expect_error<LoraError>([&] { validate_lora_embeddings(e, narrow, {}); },
                              "embed_tokens has 16777217 rows (the adapter's vocabulary); it must "
                              "be in [the base vocab_size = 100, 16777216]");
    }
  }
}

TEST(LoraValidationTest, AnExtendedVocabularyNeedsBothTables) {
  Parts embed_only;
  embed_only[P::kEmbedTokens] = emb_part(110, 64);
  expect_parts_error(embed_only,
                     "embed_tokens has 110 rows but the adapter brings no lm_head (the base "
                     "model's has vocab_size = 100 rows): an extended vocabulary needs both "
                     "tables");
  Parts head_only;
  head_only[P::kLmHead] = emb_part(110, 64);
  expect_parts_error(head_only,
                     "lm_head has 110 rows but the adapter brings no embed_tokens (the base "
                     "model's has vocab_size = 100 rows)");
  // Kept tied: one array for both is both tables.
  Parts tied;
  tied[P::kEmbedTokens] = emb_part(110, 64);
  tied[P::kLmHead] = tied[P::kEmbedTokens];
  expect_parts_ok(tied);
}

TEST(LoraValidationTest, LoraPairsOnEmbeddingsHaveTheirShapes) {
  // V is the tables' when given, else the base vocabulary.
  Parts embed;
  embed[P::kEmbedLoraA] = emb_part(2, 100);
  embed[P::kEmbedLoraB] = emb_part(64, 2);
  embed[P::kLmHeadLoraA] = emb_part(3, 64);
  embed[P::kLmHeadLoraB] = emb_part(100, 3);
  expect_parts_ok(embed);
  Parts wide = embed;
  wide[P::kEmbedTokens] = emb_part(110, 64);
  wide[P::kLmHead] = emb_part(110, 64);
  expect_parts_error(wide, "embed_lora_a must be [r, V] (any x 110 for this model), got [2, 100]");
  wide[P::kEmbedLoraA] = emb_part(2, 110);
  expect_parts_error(wide, "lm_head_lora_b must be [V, r] (110 x 3 for this model), got [100, 3]");
  wide[P::kLmHeadLoraB] = emb_part(110, 3);
  expect_parts_ok(wide);

  Parts b_rank = embed;
  b_rank[P::kEmbedLoraB] = emb_part(64, 3);
  expect_parts_error(b_rank,
                     "embed_lora_b must be [hidden_size, r] (64 x 2 for this model), got [64, 3]");
  Parts b_rows = embed;
  b_rows[P::kEmbedLoraB] = emb_part(63, 2);
  expect_parts_error(b_rows, "embed_lora_b must be [hidden_size, r] (64 x 2 for this model)");
  Parts head_a = embed;
  head_a[P::kLmHeadLoraA] = emb_part(3, 32);
  expect_parts_error(head_a,
                     "lm_head_lora_a must be [r, hidden_size] (any x 64 for this model), got "
                     "[3, 32]");
  Parts head_b = embed;
  head_b[P::kLmHeadLoraB] = emb_part(100, 2);
  expect_parts_error(head_b,
                     "lm_head_lora_b must be [V, r] (100 x 3 for this model), got [100, 2]");
}

TEST(LoraValidationTest, LoraPairsOnEmbeddingsComeTogether) {
  Parts a_only;
  a_only[P::kEmbedLoraA] = emb_part(2, 100);
  expect_parts_error(a_only,
                     "embed_lora_b is missing: embed_lora_a and embed_lora_b come together");
  Parts b_only;
  b_only[P::kEmbedLoraB] = emb_part(64, 2);
  expect_parts_error(b_only,
                     "embed_lora_a is missing: embed_lora_a and embed_lora_b come together");
  Parts head_a_only;
  head_a_only[P::kLmHeadLoraA] = emb_part(2, 64);
  expect_parts_error(head_a_only,
                     "lm_head_lora_b is missing: lm_head_lora_a and lm_head_lora_b come together");
  Parts head_b_only;
  head_b_only[P::kLmHeadLoraB] = emb_part(100, 2);
  expect_parts_error(head_b_only, "lm_head_lora_a is missing");
}

TEST(LoraValidationTest, LoraRanksOnEmbeddingsAreInOneToMaxRank) {
  Parts zero;
  zero[P::kEmbedLoraA] = emb_part(0, 100);
  zero[P::kEmbedLoraB] = emb_part(64, 0);
  expect_parts_error(zero, "embed_lora_a has rank 0; it must be in [1, max_lora_rank = 64]");
  Parts nine;
  nine[P::kLmHeadLoraA] = emb_part(9, 64);
  nine[P::kLmHeadLoraB] = emb_part(100, 9);
  expect_parts_error(nine, "lm_head_lora_a has rank 9; it must be in [1, max_lora_rank = 8]",
                     LoraLimits{8, std::nullopt});
  expect_parts_ok(nine, LoraLimits{9, std::nullopt});
}

TEST(LoraValidationTest, PartsMustHaveTheRequiredDtype) {
  Parts parts;
  parts[P::kEmbedTokens] = emb_part(100, 64);
  parts[P::kLmHeadLoraA] = emb_part(2, 64);
  parts[P::kLmHeadLoraB] = emb_part(100, 2);
  const LoraEmbeddings bf16 = LoraEmbeddings(parts).to(DType::kBFloat16);
  const PartsOnly a{LoraWeights(Tensor(nullptr, DType::kBFloat16, {0, 0}), nullptr,
                                std::make_shared<const LoraEmbeddings>(bf16)),
                    LoraConfig::from_rows({})};
  EXPECT_NO_THROW(validate_lora(&a.weights, &a.config, small_llama(), {}));
  EXPECT_NO_THROW(validate_lora(&a.weights, &a.config, small_llama(), {64, DType::kBFloat16}));
  // Rows of the required dtype do not excuse parts of another.
  const PartsOnly f32_rows{LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                                       std::make_shared<const LoraEmbeddings>(bf16)),
                           LoraConfig::from_rows({})};
  expect_lora_error(&f32_rows.weights, &f32_rows.config,
                    "embed_tokens has dtype bfloat16 but the adapter must be float32",
                    LoraLimits{64, DType::kFloat32});
  // One part of another dtype among float32 ones.
  Parts mixed = parts;
  mixed[P::kLmHeadLoraB] = {bf16.part(P::kLmHeadLoraB), nullptr};
  expect_parts_error(mixed, "lm_head_lora_b has dtype bfloat16 but the adapter must be float32",
                     LoraLimits{64, DType::kFloat32});
}

// A LoRA pair has one dtype: lm_head's runs as one LoraPair, and a mixed one would pass here and
// fail only when the LoRA cache laid the adapter out for a step (the request's error reported as
// the runtime's).
TEST(LoraValidationTest, LoraPairsOnEmbeddingsHaveOneDtype) {
  Parts parts;
  parts[P::kLmHeadLoraA] = emb_part(2, 64);
  parts[P::kLmHeadLoraB] = emb_part(100, 2);
  parts[P::kEmbedLoraA] = emb_part(3, 100);
  parts[P::kEmbedLoraB] = emb_part(64, 3);
  const LoraEmbeddings bf16 = LoraEmbeddings(parts).to(DType::kBFloat16);
  Parts head = parts;
  head[P::kLmHeadLoraB] = {bf16.part(P::kLmHeadLoraB), nullptr};
  expect_parts_error(head,
                     "lm_head_lora_a is float32 but lm_head_lora_b is bfloat16; a LoRA pair has "
                     "one dtype");
  Parts embed = parts;
  embed[P::kEmbedLoraA] = {bf16.part(P::kEmbedLoraA), nullptr};
  expect_parts_error(embed,
                     "embed_lora_a is bfloat16 but embed_lora_b is float32; a LoRA pair has one "
                     "dtype");
  expect_parts_ok(parts);
  Parts all_bf16;
  for (int p : {P::kLmHeadLoraA, P::kLmHeadLoraB, P::kEmbedLoraA, P::kEmbedLoraB}) {
    all_bf16[p] = {bf16.part(p), nullptr};
  }
  expect_parts_ok(all_bf16);
}

TEST(LoraValidationTest, PartsMustBeFinite) {
  Parts nan_embed;
  nan_embed[P::kEmbedTokens] = emb_part(100, 64, {{3 * 64 + 5, kNan}});
  expect_parts_error(nan_embed, "embed_tokens[3, 5] is nan; LoRA weights must be finite");
  Parts inf_head;
  inf_head[P::kEmbedTokens] = emb_part(110, 64);
  inf_head[P::kLmHead] = emb_part(110, 64, {{110 * 64 - 1, -kInf}});
  expect_parts_error(inf_head, "lm_head[109, 63] is inf; LoRA weights must be finite");
  Parts lora;
  lora[P::kEmbedLoraA] = emb_part(2, 100);
  lora[P::kEmbedLoraB] = emb_part(64, 2, {{7, kInf}});
  expect_parts_error(lora, "embed_lora_b[3, 1] is inf");
  Parts head;
  head[P::kLmHeadLoraA] = emb_part(2, 64, {{64, kNan}});
  head[P::kLmHeadLoraB] = emb_part(100, 2);
  expect_parts_error(head, "lm_head_lora_a[1, 0] is nan");
  // 16-bit parts keep inf and nan.
  const LoraEmbeddings half = LoraEmbeddings(nan_embed).to(DType::kFloat16);
  expect_error<LoraError>([&] { validate_lora_embeddings(half, small_llama(), {}); },
                          "embed_tokens[3, 5] is nan");
}

}  // namespace
}  // namespace lorart
