#include "model/lora_adapter.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <sstream>
#include <vector>

#include "core/errors.h"
#include "lora/module_ids.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

// hidden 32, intermediate 48, q 4 x 8 = 32, kv 2 x 8 = 16, 2 layers.
ModelConfig tiny_config() { return testing_util::llama_config(64, 32, 48, 2, 4, 2, 8); }

TEST(LoraAdapterTest, StorageBytesAreRankTimesInPlusOut) {
  const ModelConfig config = tiny_config();
  const LoraConfig rows =
      LoraConfig::from_rows({{lora_module::kAttnQ, 0, 2},
                             {lora_module::kMlp4HToH, 1, 4}});  // 2 * (32 + 32), 4 * (48 + 32)
  EXPECT_EQ(LoraAdapter::storage_bytes(rows, config, DType::kFloat32), (128 + 320) * 4);
  EXPECT_EQ(LoraAdapter::storage_bytes(rows, config, DType::kBFloat16), (128 + 320) * 2);

  const std::vector<float> values(2 * 320, 0.5f);
  const LoraAdapter adapter(
      LoraWeights::copy_of(Tensor(const_cast<float*>(values.data()), DType::kFloat32, {2, 320})),
      rows, config, 8);
  EXPECT_EQ(adapter.nbytes(), (128u + 320) * 4);
  EXPECT_EQ(adapter.max_rank(), 4);
  EXPECT_TRUE(adapter.fits(config));
  std::ostringstream shape;
  shape << adapter.model_shape();
  EXPECT_EQ(shape.str(), "2 layers, hidden 32, intermediate 48, q 32, kv 16, vocab 64");
  ModelConfig other = config;
  other.intermediate_size = 64;
  EXPECT_FALSE(adapter.fits(other));
}

TEST(LoraAdapterTest, StorageBytesThatOverflowAreRefused) {
  // Rows the LoRA cache would size before it lays them out: each 2^31 - 1 ranks of a module
  // whose in + out is near 2^32, so their sum overflows int64.
  ModelConfig config = tiny_config();
  config.hidden_size = config.intermediate_size = ModelConfig::kMaxDim;
  const int32_t rank = ModelConfig::kMaxDim;
  const LoraConfig rows = LoraConfig::from_rows({{lora_module::kMlp4HToH, 0, rank},
                                                 {lora_module::kMlp4HToH, 1, rank},
                                                 {lora_module::kMlpGate, 1, rank}});
  expect_error<InvalidArgument>([&] { LoraAdapter::storage_bytes(rows, config, DType::kFloat32); },
                                "LoRA adapter storage values = ");
}

using P = LoraEmbeddings;

// A [rows, cols] part of seeded values in `dtype`, owning its storage.
P::Input part(int64_t rows, int64_t cols, uint32_t seed, DType dtype = DType::kFloat32) {
  const std::vector<float> values = testing_util::random_floats(rows * cols, seed);
  auto buffer = std::make_shared<std::vector<char>>(values.size() * dtype_size(dtype));
  convert_floats(values.data(), DType::kFloat32, buffer->data(), dtype, values.size());
  return {Tensor(buffer->data(), dtype, {rows, cols}), buffer};
}

float at(const Tensor& t, int64_t i) {
  float v = 0.0f;
  convert_floats(static_cast<const char*>(t.data()) + i * dtype_size(t.dtype()), t.dtype(), &v,
                 DType::kFloat32, 1);
  return v;
}

// An adapter of rows (attn_q rank 2 DoRA, mlp_4h_to_h rank 1) and every embedding-side part:
// tied tables of V = 80, LoRA on embed_tokens (rank 2, bf16) and on lm_head (rank 3).
struct Full {
  std::array<P::Input, P::kNumParts> parts;
  LoraWeights weights;
  LoraConfig config;
  std::vector<float> scales;
};
Full full_adapter() {
  std::array<P::Input, P::kNumParts> parts;
  parts[P::kEmbedTokens] = part(80, 32, 1);
  parts[P::kLmHead] = parts[P::kEmbedTokens];
  parts[P::kEmbedLoraA] = part(2, 80, 2, DType::kBFloat16);
  parts[P::kEmbedLoraB] = part(32, 2, 3, DType::kBFloat16);
  parts[P::kLmHeadLoraA] = part(3, 32, 4);
  parts[P::kLmHeadLoraB] = part(80, 3, 5);
  // attn_q rank 2: 2 * (32 + 32) + 32 magnitudes; mlp_4h_to_h rank 1: 48 + 32.
  std::vector<float> rows = testing_util::random_floats(2 * 160, 6);
  LoraWeights w(Tensor(rows.data(), DType::kFloat32, {2, 160}), nullptr,
                std::make_shared<const LoraEmbeddings>(parts));
  return {
      parts, w.copy(),
      LoraConfig::from_rows({{lora_module::kAttnQ, 0, 2, 1}, {lora_module::kMlp4HToH, 1, 1, 0}}),
      testing_util::random_floats(32, 7, 0.5f, 1.5f)};
}

TEST(LoraAdapterTest, EmbeddingSidePartsAreLaidOutForTheForward) {
  const ModelConfig config = tiny_config();
  const Full f = full_adapter();
  const LoraAdapter adapter(f.weights, f.config, config, 8, &f.scales);
  const LoraEmbeddings& e = *f.weights.embeddings();
  EXPECT_EQ(adapter.vocab_size(), 80);
  EXPECT_TRUE(adapter.has_embedding_parts());
  EXPECT_TRUE(adapter.has_dora());
  EXPECT_EQ(adapter.max_rank(), 3);  // lm_head's LoRA is the widest
  // Own copies; the tied table once.
  ASSERT_TRUE(adapter.embed_tokens().defined());
  EXPECT_NE(adapter.embed_tokens().data(), e.part(P::kEmbedTokens).data());
  EXPECT_EQ(
      0, std::memcmp(adapter.embed_tokens().data(), e.part(P::kEmbedTokens).data(), 80 * 32 * 4));
  EXPECT_EQ(adapter.lm_head().data(), adapter.embed_tokens().data());
  // LoRA A of the embedding as A^T [V, r] (a row per id), in its own dtype; B as given.
  const Tensor& a_t = adapter.embed_lora_a_t();
  ASSERT_EQ(a_t.size(0), 80);
  ASSERT_EQ(a_t.size(1), 2);
  EXPECT_EQ(a_t.dtype(), DType::kBFloat16);
  for (int64_t v = 0; v < 80; ++v) {
    for (int64_t r = 0; r < 2; ++r) {
      ASSERT_EQ(at(a_t, v * 2 + r), at(e.part(P::kEmbedLoraA), r * 80 + v)) << v << "," << r;
    }
  }
  EXPECT_EQ(adapter.embed_lora_b().size(0), 32);
  EXPECT_EQ(0, std::memcmp(adapter.embed_lora_b().data(), e.part(P::kEmbedLoraB).data(), 64 * 2));
  // lm_head's pair: A [r, H] and B^T [r, V].
  const LoraPair& head = adapter.lm_head_pair();
  EXPECT_EQ(head.rank, 3);
  EXPECT_EQ(head.dtype, DType::kFloat32);
  EXPECT_EQ(0, std::memcmp(head.a, e.part(P::kLmHeadLoraA).data(), 3 * 32 * 4));
  const auto* b_t = static_cast<const float*>(head.b_t);
  for (int64_t v = 0; v < 80; ++v) {
    for (int64_t r = 0; r < 3; ++r) {
      ASSERT_EQ(b_t[r * 80 + v], at(e.part(P::kLmHeadLoraB), v * 3 + r)) << v << "," << r;
    }
  }
  // The DoRA row's pair points at its scales; the plain row's has none.
  const LoraPair& q = adapter.pair(0, lora_module::kAttnQ);
  ASSERT_NE(q.dora_scale, nullptr);
  for (int o = 0; o < 32; ++o) EXPECT_EQ(q.dora_scale[o], f.scales[o]) << o;
  EXPECT_EQ(adapter.pair(1, lora_module::kMlp4HToH).dora_scale, nullptr);
  EXPECT_EQ(adapter.pair(1, lora_module::kMlp4HToH).rank, 1);
}

// What the LoRA cache books on its device level is what the adapter holds.
TEST(LoraAdapterTest, StorageBytesCountThePartsOnceAndTheDoraScales) {
  const ModelConfig config = tiny_config();
  const Full f = full_adapter();
  const int64_t rows = (2 * 64 + 80) * 4 + 32 * 4;  // pairs in float32, 32 DoRA scales
  EXPECT_EQ(LoraAdapter::storage_bytes(f.config, config, DType::kFloat32), rows);
  const int64_t parts = 80 * 32 * 4 + (2 * 80 + 32 * 2) * 2 + (3 * 32 + 80 * 3) * 4;
  EXPECT_EQ(LoraAdapter::storage_bytes(f.weights, f.config, config), rows + parts);
  const LoraAdapter adapter(f.weights, f.config, config, 8, &f.scales);
  EXPECT_EQ(static_cast<int64_t>(adapter.nbytes()), rows + parts);

  // Untied tables count twice, on both sides.
  std::array<P::Input, P::kNumParts> untied;
  untied[P::kEmbedTokens] = part(80, 32, 1);
  untied[P::kLmHead] = part(80, 32, 1);
  const LoraWeights w(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(untied));
  const LoraConfig none = LoraConfig::from_rows({});
  const LoraAdapter two(w, none, config, 8);
  EXPECT_EQ(LoraAdapter::storage_bytes(w, none, config), 2 * 80 * 32 * 4);
  EXPECT_EQ(two.nbytes(), 2u * 80 * 32 * 4);
  EXPECT_NE(two.lm_head().data(), two.embed_tokens().data());
  EXPECT_EQ(two.max_rank(), 0);
  EXPECT_FALSE(two.has_dora());
  EXPECT_TRUE(two.has_embedding_parts());
}

// to_device keeps the layout at another address: every pair's bytes are the original's (tested
// here with the host as the target; the CUDA runner test takes the device), the DoRA / embedding
// adapters the CUDA path cannot read are refused.
TEST(LoraAdapterTest, ToDeviceCopiesThePairsToANewAllocation) {
  const ModelConfig config = tiny_config();
  const LoraConfig rows = LoraConfig::from_rows(
      {{lora_module::kAttnQ, 0, 2}, {lora_module::kMlp4HToH, 1, 4}, {lora_module::kAttnV, 1, 3}});
  const std::vector<float> values = testing_util::random_floats(3 * 320, 5);
  const LoraAdapter adapter(
      LoraWeights::copy_of(Tensor(const_cast<float*>(values.data()), DType::kFloat32, {3, 320})),
      rows, config, 8);
  const LoraAdapter copy = adapter.to_device(Device::cpu());
  EXPECT_EQ(copy.pairs_device(), Device::cpu());
  EXPECT_EQ(copy.max_rank(), 4);
  EXPECT_TRUE(copy.fits(config));
  for (int64_t i = 0; i < 2 * lora_module::kCount; ++i) {
    const LoraPair &a = adapter.pairs()[i], &b = copy.pairs()[i];
    ASSERT_EQ(a.rank, b.rank);
    if (a.rank == 0) continue;
    const LoraModuleDims d = config.lora_module_dims(static_cast<int32_t>(i % lora_module::kCount));
    EXPECT_NE(a.a, b.a);
    EXPECT_EQ(std::memcmp(a.a, b.a, a.rank * d.in * sizeof(float)), 0) << "pair " << i;
    EXPECT_EQ(std::memcmp(a.b_t, b.b_t, a.rank * d.out * sizeof(float)), 0) << "pair " << i;
  }
  const Full f = full_adapter();
  const LoraAdapter dora(f.weights, f.config, config, 8, &f.scales);
  expect_error<LoraError>([&] { dora.to_device(Device::cpu()); }, "which cannot run on cpu yet");
}

TEST(LoraAdapterTest, DoraRowsNeedTheirScales) {
  const ModelConfig config = tiny_config();
  const Full f = full_adapter();
  expect_error<LoraError>([&] { LoraAdapter(f.weights, f.config, config, 8); },
                          "the adapter has DoRA rows: it needs their 32 scales (magnitude / ||W + "
                          "B A||, computed against the base weights by the model), got 0");
  const std::vector<float> five(5, 1.0f);
  expect_error<LoraError>([&] { LoraAdapter(f.weights, f.config, config, 8, &five); }, "got 5");
  expect_error<LoraError>(
      [&] { LoraAdapter::from_validated(f.weights, f.config, config, nullptr); }, "got 0");
  // Without embedding-side parts or DoRA rows, an adapter has neither.
  const std::vector<float> values(64, 0.5f);
  const LoraAdapter plain(
      LoraWeights::copy_of(Tensor(const_cast<float*>(values.data()), DType::kFloat32, {1, 64})),
      LoraConfig::from_rows({{lora_module::kAttnQ, 0, 1}}), config, 8);
  EXPECT_FALSE(plain.has_embedding_parts());
  EXPECT_FALSE(plain.has_dora());
  EXPECT_EQ(plain.vocab_size(), 0);
  EXPECT_FALSE(plain.embed_tokens().defined());
  EXPECT_EQ(plain.lm_head_pair().rank, 0);
}

}  // namespace
}  // namespace lorart
