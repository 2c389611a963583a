#include "model/dora.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "core/errors.h"
#include "lora/lora_validation.h"
#include "lora/module_ids.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 32, intermediate 48 (down's K has a tail past its 32-block), q 32, kv 16, 2 layers.
ModelConfig tiny_config() { return testing_util::llama_config(64, 32, 48, 2, 4, 2, 8); }

// A random checkpoint, its values as the weights of `dtype` hold them (rounded for 16 bits).
struct Base {
  std::map<std::string, std::vector<float>> values;
  ModelWeights weights;
};
Base make_base(const ModelConfig& c, DType dtype) {
  std::map<std::string, std::vector<float>> values;
  std::map<std::string, std::vector<int64_t>> shapes;
  uint32_t seed = 1;
  testing_util::for_each_llama_param(
      c, [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
        std::vector<float> v = testing_util::random_floats(
            shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi);
        std::vector<uint16_t> words(v.size());
        if (dtype != DType::kFloat32) {  // what the 16-bit weights hold
          convert_floats(v.data(), DType::kFloat32, words.data(), dtype, v.size());
          convert_floats(words.data(), dtype, v.data(), DType::kFloat32, v.size());
        }
        values[name] = std::move(v);
        shapes[name] = std::move(shape);
      });
  ModelWeightsBuilder builder(c, dtype);
  for (auto& [name, v] : values) {
    const std::vector<int64_t>& s = shapes[name];
    builder.add(name, s.size() == 1 ? Tensor(v.data(), DType::kFloat32, {s[0]})
                                    : Tensor(v.data(), DType::kFloat32, {s[0], s[1]}));
  }
  return {std::move(values), ModelWeights(std::move(builder))};
}

// The HF weight rows a module adapts, [out, in] (attn_qkv: q, k and v stacked).
std::vector<float> module_weight(const Base& base, const ModelConfig& c, int32_t module_id,
                                 int32_t layer) {
  static const std::map<int32_t, std::vector<std::string>> kTargets = {
      {lora_module::kAttnQkv, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
      {lora_module::kAttnQ, {"self_attn.q_proj"}},
      {lora_module::kAttnK, {"self_attn.k_proj"}},
      {lora_module::kAttnV, {"self_attn.v_proj"}},
      {lora_module::kAttnDense, {"self_attn.o_proj"}},
      {lora_module::kMlpHTo4H, {"mlp.gate_proj"}},
      {lora_module::kMlp4HToH, {"mlp.down_proj"}},
      {lora_module::kMlpGate, {"mlp.up_proj"}}};
  std::vector<float> out;
  for (const std::string& t : kTargets.at(module_id)) {
    const std::vector<float>& w =
        base.values.at("model.layers." + std::to_string(layer) + "." + t + ".weight");
    out.insert(out.end(), w.begin(), w.end());
  }
  EXPECT_EQ(static_cast<int64_t>(out.size()),
            c.lora_module_dims(module_id).in * c.lora_module_dims(module_id).out);
  return out;
}

// Rows of `rows`' sizes (with magnitudes for DoRA rows), A and B random, magnitudes in [0.5, 2).
LoraWeights make_rows(const ModelConfig& c, const std::vector<LoraConfigRow>& rows,
                      int64_t row_size) {
  std::vector<float> values(rows.size() * row_size, 0.0f);
  for (size_t i = 0; i < rows.size(); ++i) {
    const LoraModuleDims d = c.lora_module_dims(rows[i].module_id);
    const int64_t pair = rows[i].adapter_size * (d.in + d.out);
    const std::vector<float> ab = testing_util::random_floats(pair, 100 + i, -0.2f, 0.2f);
    const std::vector<float> m = testing_util::random_floats(d.out, 200 + i, 0.5f, 2.0f);
    std::copy(ab.begin(), ab.end(), values.begin() + i * row_size);
    if (rows[i].is_dora) std::copy(m.begin(), m.end(), values.begin() + i * row_size + pair);
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  return LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {n, row_size}));
}

// m[o] / ||W[o, :] + B[o, :] @ A|| in float64, for row `i`.
std::vector<double> reference(const Base& base, const ModelConfig& c, const LoraWeights& w,
                              const LoraConfigRow& row, int64_t i) {
  const LoraModuleDims d = c.lora_module_dims(row.module_id);
  const int64_t r = row.adapter_size;
  const std::vector<float> weight = module_weight(base, c, row.module_id, row.layer_idx);
  std::vector<double> out(d.out);
  for (int64_t o = 0; o < d.out; ++o) {
    double sum = 0.0;
    for (int64_t k = 0; k < d.in; ++k) {
      double v = weight[o * d.in + k];
      for (int64_t j = 0; j < r; ++j) {
        v += double{w.value(i, r * d.in + o * r + j)} * w.value(i, j * d.in + k);
      }
      sum += v * v;
    }
    out[o] = w.value(i, r * (d.in + d.out) + o) / std::sqrt(sum);
  }
  return out;
}

class DoraScalesModelTest : public ::testing::TestWithParam<DType> {};

INSTANTIATE_TEST_SUITE_P(WeightDtypes, DoraScalesModelTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Every module (q, k and v at their rows of the fused qkv, gate and up in gate_up), mixed ranks,
// a plain row between DoRA rows: the scales of the DoRA rows, in row order.
TEST_P(DoraScalesModelTest, EachDoraRowAgainstItsBaseRows) {
  const ModelConfig c = tiny_config();
  const Base base = make_base(c, GetParam());
  if (GetParam() == DType::kBFloat16) {
    ASSERT_EQ(base.weights.matrix_layout(), WeightLayout::kK32Interleaved);
  }
  const std::vector<LoraConfigRow> rows = {
      {lora_module::kAttnQ, 0, 2, 1},     {lora_module::kAttnK, 1, 1, 1},
      {lora_module::kAttnV, 0, 3, 1},     {lora_module::kMlpHTo4H, 0, 2, 0},
      {lora_module::kAttnDense, 1, 2, 1}, {lora_module::kMlpHTo4H, 1, 2, 1},
      {lora_module::kMlpGate, 0, 4, 1},   {lora_module::kMlp4HToH, 1, 2, 1},
      {lora_module::kAttnQkv, 1, 1, 1}};
  const LoraConfig config = LoraConfig::from_rows(rows);
  const LoraWeights w = make_rows(c, rows, 4 * (32 + 48) + 48);
  validate_lora(&w, &config, c.lora_target(), {});
  const std::vector<float> scales = dora_scales(ExecContext::cpu(), base.weights, w, config);
  int64_t expected_size = 0;
  for (const LoraConfigRow& r : rows) {
    if (r.is_dora) expected_size += c.lora_module_dims(r.module_id).out;
  }
  ASSERT_EQ(static_cast<int64_t>(scales.size()), expected_size);
  int64_t offset = 0;
  for (int64_t i = 0; i < config.num_rows(); ++i) {
    if (!rows[i].is_dora) continue;
    SCOPED_TRACE(lora_module_name(rows[i].module_id));
    const std::vector<double> want = reference(base, c, w, rows[i], i);
    for (size_t o = 0; o < want.size(); ++o) {
      ASSERT_NEAR(scales[offset + o], want[o], 2.5e-7 * want[o]) << "row " << i << " out " << o;
    }
    offset += static_cast<int64_t>(want.size());
  }
  // No DoRA rows: nothing.
  const LoraConfig plain = LoraConfig::from_rows({{lora_module::kAttnQ, 0, 2}});
  EXPECT_TRUE(dora_scales(ExecContext::cpu(), base.weights, w, plain).empty());
}

// A zero row norm, or a magnitude too large for float32 over a small one, is a LoraError naming
// the row and the output.
TEST(DoraScalesModelErrorsTest, NonFiniteScalesAreRefusedByRow) {
  const ModelConfig c = tiny_config();
  const Base base = make_base(c, DType::kFloat32);
  const std::vector<float> wk = module_weight(base, c, lora_module::kAttnK, 1);  // [16, 32]
  // Row 1: attn_k of layer 1, rank 1: A = W_k[3, :], B[3] = -b3, other B rows 0; magnitudes m.
  auto adapter = [&](float b3, float m) {
    const int64_t row_size = 32 + 16 + 16;
    std::vector<float> values(2 * row_size, 0.1f);
    float* row = values.data() + row_size;
    std::copy(wk.begin() + 3 * 32, wk.begin() + 4 * 32, row);
    std::fill(row + 32, row + 48, 0.0f);
    row[32 + 3] = -b3;
    std::fill(row + 48, row + 64, m);
    return LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {2, row_size}));
  };
  const LoraConfig config =
      LoraConfig::from_rows({{lora_module::kAttnQ, 0, 1, 0}, {lora_module::kAttnK, 1, 1, 1}});
  const LoraWeights zero_norm = adapter(1.0f, 1.0f);
  validate_lora(&zero_norm, &config, c.lora_target(), {});
  expect_error<LoraError>(
      [&] { dora_scales(ExecContext::cpu(), base.weights, zero_norm, config); },
      "lora_config row 1 (attn_k, layer 1, DoRA): magnitude / ||W + B A|| at output 3 is inf (the "
      "row norm of the adapted weight is 0 or the magnitude too large); DoRA needs a finite scale");
  // Norm 1e-3 * ||W_k[3]||: 3e38 / norm overflows float32.
  expect_error<LoraError>(
      [&] { dora_scales(ExecContext::cpu(), base.weights, adapter(0.999f, 3e38f), config); },
      "lora_config row 1 (attn_k, layer 1, DoRA): magnitude / ||W + B A|| at output 3 is inf");
  // Zero magnitude over a zero norm: nan.
  expect_error<LoraError>(
      [&] { dora_scales(ExecContext::cpu(), base.weights, adapter(1.0f, 0.0f), config); },
      "nan (the row norm of the adapted weight is 0");
  // The same row with a finite scale everywhere passes.
  EXPECT_EQ(dora_scales(ExecContext::cpu(), base.weights, adapter(0.5f, 1.0f), config).size(), 16u);
}

}  // namespace
}  // namespace lorart
