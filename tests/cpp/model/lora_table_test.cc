#include "model/lora_table.h"

#include <gtest/gtest.h>

#include <array>
#include <memory>
#include <vector>

#include "core/errors.h"
#include "lora/module_ids.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

ModelConfig config_of(int64_t layers) {
  return testing_util::llama_config(32, 16, 24, layers, 2, 1, 8);
}

LoraAdapter adapter_of(const ModelConfig& c, int32_t layer, int32_t rank) {
  const LoraModuleDims d = c.lora_module_dims(lora_module::kAttnQ);
  std::vector<float> values(rank * (d.in + d.out), 0.25f);
  const LoraWeights weights = LoraWeights::copy_of(
      Tensor(values.data(), DType::kFloat32, {1, static_cast<int64_t>(values.size())}));
  return LoraAdapter(weights, LoraConfig::from_rows({{lora_module::kAttnQ, layer, rank}}), c, 64);
}

// Slot s's entry for (layer, module) is the adapter's own pair; a slot added with add_none()
// adapts nothing; clear() empties the table for the next step.
TEST(LoraTableTest, SlotsCopyTheirAdaptersPairs) {
  const ModelConfig c = config_of(2);
  const LoraAdapter first = adapter_of(c, 1, 4), second = adapter_of(c, 0, 8);
  LoraTable table(c);
  EXPECT_EQ(table.pairs_per_slot(), 2 * lora_module::kCount);
  EXPECT_EQ(table.add(first), 0);
  EXPECT_EQ(table.add_none(), 1);
  EXPECT_EQ(table.add(second), 2);
  EXPECT_EQ(table.num_slots(), 3);
  EXPECT_EQ(table.max_rank(), 8);
  const std::vector<LoraRun> runs = {{0, 3, 2}, {3, 4, 0}};
  const ops::LoraBatch batch = table.batch(runs);
  ASSERT_EQ(batch.num_runs, 2);
  EXPECT_EQ(batch.runs, runs.data());
  EXPECT_EQ(batch.num_slots, 3);
  const int64_t q_of_layer1 = 1 * lora_module::kCount + lora_module::kAttnQ;
  const LoraPair& p0 = batch.pairs[0 * batch.pairs_per_slot + q_of_layer1];
  EXPECT_EQ(p0.rank, 4);
  EXPECT_EQ(p0.a, first.pair(1, lora_module::kAttnQ).a);
  EXPECT_EQ(batch.pairs[1 * batch.pairs_per_slot + q_of_layer1].rank, 0);
  EXPECT_EQ(batch.pairs[2 * batch.pairs_per_slot + lora_module::kAttnQ].rank, 8);
  EXPECT_EQ(batch.pairs[2 * batch.pairs_per_slot + q_of_layer1].rank, 0);
  table.clear();
  EXPECT_EQ(table.num_slots(), 0);
  EXPECT_EQ(table.max_rank(), 0);
}

TEST(LoraTableTest, AnAdapterOfAnotherModelShapeIsRefused) {
  const ModelConfig shallow = config_of(1);
  const LoraAdapter adapter = adapter_of(shallow, 0, 4);
  LoraTable table(config_of(2));
  expect_error<InvalidArgument>([&] { table.add(adapter); },
                                "the adapter was laid out for a model of another shape (1 layers");
  EXPECT_EQ(table.num_slots(), 0);
}

// An adapter of embedding-side tables only, of vocabulary `vocab`.
LoraAdapter tables_of(const ModelConfig& c, int64_t vocab) {
  auto values = std::make_shared<std::vector<float>>(vocab * c.hidden_size, 0.5f);
  std::array<LoraEmbeddings::Input, LoraEmbeddings::kNumParts> parts;
  parts[LoraEmbeddings::kEmbedTokens] = {
      Tensor(values->data(), DType::kFloat32, {vocab, c.hidden_size}), values};
  parts[LoraEmbeddings::kLmHead] = parts[LoraEmbeddings::kEmbedTokens];
  const LoraWeights w(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(parts));
  return LoraAdapter(w, LoraConfig::from_rows({}), c, 64);
}

// The table keeps each slot's adapter for the forward's embedding-side paths and sums up what
// the step needs: whether any slot has such parts or DoRA, and the widest vocabulary.
TEST(LoraTableTest, SlotsKeepTheirAdaptersVocabularies) {
  const ModelConfig c = config_of(2);
  const LoraAdapter plain = adapter_of(c, 0, 4), wide = tables_of(c, 50), wider = tables_of(c, 70);
  LoraTable table(c);
  table.add(plain);
  table.add_none();
  EXPECT_FALSE(table.has_embedding_parts());
  EXPECT_FALSE(table.has_dora());
  EXPECT_EQ(table.max_vocab_size(), 0);
  table.add(wider);
  table.add(wide);
  EXPECT_TRUE(table.has_embedding_parts());
  EXPECT_EQ(table.max_vocab_size(), 70);
  EXPECT_EQ(table.adapter(0), &plain);
  EXPECT_EQ(table.adapter(1), nullptr);
  EXPECT_EQ(table.adapter(2), &wider);
  EXPECT_EQ(table.adapter(3), &wide);
  EXPECT_EQ(table.adapter(4), nullptr);
  EXPECT_EQ(table.adapter(-1), nullptr);
  EXPECT_EQ(table.vocab_size(-1, 32), 32);  // base
  EXPECT_EQ(table.vocab_size(0, 32), 32);   // an adapter that keeps the model's
  EXPECT_EQ(table.vocab_size(1, 32), 32);
  EXPECT_EQ(table.vocab_size(2, 32), 70);
  EXPECT_EQ(table.vocab_size(3, 32), 50);
  table.clear();
  EXPECT_FALSE(table.has_embedding_parts());
  EXPECT_EQ(table.max_vocab_size(), 0);
  EXPECT_EQ(table.adapter(0), nullptr);
  EXPECT_EQ(table.add(plain), 0);
  EXPECT_EQ(table.vocab_size(0, 32), 32);
}

TEST(LoraTableTest, ADoraAdapterMarksTheTableAndItsPairsCarryTheScales) {
  const ModelConfig c = config_of(1);
  const LoraModuleDims d = c.lora_module_dims(lora_module::kAttnV);
  std::vector<float> values(2 * (d.in + d.out) + d.out, 0.25f);
  const LoraWeights w = LoraWeights::copy_of(
      Tensor(values.data(), DType::kFloat32, {1, static_cast<int64_t>(values.size())}));
  const std::vector<float> scales(d.out, 1.5f);
  const LoraAdapter dora(w, LoraConfig::from_rows({{lora_module::kAttnV, 0, 2, 1}}), c, 64,
                         &scales);
  const LoraAdapter plain = adapter_of(c, 0, 2);
  LoraTable table(c);
  table.add(plain);
  EXPECT_FALSE(table.has_dora());
  table.add(dora);
  EXPECT_TRUE(table.has_dora());
  const std::vector<LoraRun> runs = {{0, 1, 1}};
  const ops::LoraBatch batch = table.batch(runs);
  const LoraPair& v = batch.pairs[1 * batch.pairs_per_slot + lora_module::kAttnV];
  ASSERT_NE(v.dora_scale, nullptr);
  EXPECT_EQ(v.dora_scale, dora.pair(0, lora_module::kAttnV).dora_scale);
  EXPECT_EQ(v.dora_scale[0], 1.5f);
  EXPECT_EQ(batch.pairs[0 * batch.pairs_per_slot + lora_module::kAttnV].dora_scale, nullptr);
  table.clear();
  EXPECT_FALSE(table.has_dora());
}

// Embedding-side parts are sized by the vocabulary the adapter was laid out for (LoRA on lm_head:
// B^T [r, V]; its own tables of V rows). On a model of the same layers but a larger vocabulary
// the forward would read them past their end: the table refuses the adapter.
TEST(LoraTableTest, AdaptersLaidOutForAnotherVocabularyAreRefused) {
  const ModelConfig c = config_of(1);  // vocab 32
  ModelConfig larger = c;
  larger.vocab_size = 40;
  auto a = std::make_shared<std::vector<float>>(2 * 16, 0.5f);
  auto b = std::make_shared<std::vector<float>>(32 * 2, 0.5f);
  std::array<LoraEmbeddings::Input, LoraEmbeddings::kNumParts> parts;
  parts[LoraEmbeddings::kLmHeadLoraA] = {Tensor(a->data(), DType::kFloat32, {2, 16}), a};
  parts[LoraEmbeddings::kLmHeadLoraB] = {Tensor(b->data(), DType::kFloat32, {32, 2}), b};
  const LoraWeights w(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(parts));
  const LoraAdapter head(w, LoraConfig::from_rows({}), c, 64);
  LoraTable table(larger);
  expect_error<InvalidArgument>([&] { table.add(head); },
                                "the adapter was laid out for a model of another shape (1 layers, "
                                "hidden 16, intermediate 24, q 16, kv 8, vocab 32; this model: 1 "
                                "layers, hidden 16, intermediate 24, q 16, kv 8, vocab 40)");
  EXPECT_EQ(table.num_slots(), 0);
  const LoraAdapter tables = tables_of(c, 36);  // 36 rows: fewer than the model's 40
  expect_error<InvalidArgument>([&] { table.add(tables); }, "vocab 32; this model:");
  LoraTable same(c);
  EXPECT_EQ(same.add(head), 0);
  EXPECT_EQ(same.add(tables), 1);
}

}  // namespace
}  // namespace lorart
