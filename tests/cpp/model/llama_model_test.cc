#include "model/llama_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/errors.h"
#include "lora/module_ids.h"
#include "model/dora.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kVocab = 64, kMaxTokens = 20, kMaxRank = 8, kNumBlocks = 40, kBlockSize = 4;

// q 4 x 8 = 32, kv 2 x 8 = 16 (GQA), hidden 32, intermediate 48, 2 layers.
ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = kVocab;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_attention_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  return c;
}

struct Param {
  std::vector<int64_t> shape;
  std::vector<float> values;
  Tensor tensor() {
    const int64_t* s = shape.data();
    return shape.size() == 1 ? Tensor(values.data(), DType::kFloat32, {s[0]})
                             : Tensor(values.data(), DType::kFloat32, {s[0], s[1]});
  }
};
using Checkpoint = std::map<std::string, Param>;

Checkpoint random_checkpoint(const ModelConfig& c) {
  std::mt19937 rng(7);
  Checkpoint ckpt;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> values(shape[0] * (shape.size() > 1 ? shape[1] : 1));
    for (float& v : values) v = dist(rng);
    ckpt[name] = Param{std::move(shape), std::move(values)};
  };
  testing_util::for_each_llama_param(c, add);
  return ckpt;
}

std::unique_ptr<LlamaModel> build_model(const ModelConfig& c, Checkpoint ckpt) {
  ModelWeightsBuilder builder(c);
  for (auto& [name, param] : ckpt) builder.add(name, param.tensor());
  return std::make_unique<LlamaModel>(c, ModelWeights(std::move(builder)), kMaxTokens, kMaxRank);
}

struct Seq {
  std::vector<int32_t> tokens;
  int32_t context;
  std::vector<int32_t> blocks;
  int32_t slot = -1;
};

// Owns the int32 arrays a ForwardBatch views.
struct Batch {
  std::vector<int32_t> token_ids, positions, seq_starts{0}, context_lens, block_tables, lora_slots,
      logits_indices;
  int64_t max_blocks = 1;
  ForwardBatch view() {
    auto vec = [](std::vector<int32_t>& v) {
      return Tensor(v.data(), DType::kInt32, {static_cast<int64_t>(v.size())});
    };
    const int64_t rows = static_cast<int64_t>(block_tables.size()) / max_blocks;
    return {vec(token_ids),
            vec(positions),
            vec(seq_starts),
            vec(context_lens),
            Tensor(block_tables.data(), DType::kInt32, {rows, max_blocks}),
            vec(lora_slots),
            vec(logits_indices)};
  }
};

// Logits of every token when `all_logits`, else of each sequence's last token.
Batch pack(const std::vector<Seq>& seqs, bool all_logits = false) {
  Batch b;
  for (const Seq& s : seqs) b.max_blocks = std::max<int64_t>(b.max_blocks, s.blocks.size());
  for (const Seq& s : seqs) {
    const int32_t begin = b.seq_starts.back();
    b.token_ids.insert(b.token_ids.end(), s.tokens.begin(), s.tokens.end());
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      // Wraps past INT32_MAX like the int32 arrays a buggy caller would pass.
      b.positions.push_back(static_cast<int32_t>(int64_t{s.context} + static_cast<int64_t>(i)));
    }
    b.seq_starts.push_back(begin + static_cast<int32_t>(s.tokens.size()));
    for (int32_t t = all_logits ? begin : b.seq_starts.back() - 1; t < b.seq_starts.back(); ++t) {
      b.logits_indices.push_back(t);
    }
    b.context_lens.push_back(s.context);
    b.lora_slots.push_back(s.slot);
    std::vector<int32_t> table = s.blocks;
    table.resize(b.max_blocks, -1);
    b.block_tables.insert(b.block_tables.end(), table.begin(), table.end());
  }
  return b;
}

std::vector<int32_t> random_tokens(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % kVocab);
  return ids;
}

// `count` rows of `actual` [*, vocab] from `row` against rows of `expected` from `expected_row`.
void expect_rows_near(const std::vector<float>& actual, int64_t row,
                      const std::vector<float>& expected, int64_t expected_row = 0,
                      int64_t count = 1, double tol = 1e-5) {
  ASSERT_GE(actual.size(), static_cast<size_t>(row + count) * kVocab);
  ASSERT_GE(expected.size(), static_cast<size_t>(expected_row + count) * kVocab);
  for (int64_t i = 0; i < count * kVocab; ++i) {
    const float want = expected[expected_row * kVocab + i];
    ASSERT_NEAR(actual[row * kVocab + i], want, tol * std::max(1.0f, std::abs(want)))
        << "row " << row + i / kVocab << ", col " << i % kVocab;
  }
}

// An adapter's rows (module, layer, rank): A and B random, or B zero.
struct AdapterData {
  LoraWeights weights;
  LoraConfig config;
};
AdapterData adapter_data(const ModelConfig& c, const std::vector<LoraConfigRow>& rows,
                         bool zero_b = false) {
  int64_t row_size = 0;
  for (const LoraConfigRow& r : rows) {
    const LoraModuleDims d = c.lora_module_dims(r.module_id);
    row_size = std::max(row_size, r.adapter_size * (d.in + d.out));
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-0.2f, 0.2f);
  std::vector<float> values(rows.size() * row_size, 0.0f);
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t a_size = rows[i].adapter_size * c.lora_module_dims(rows[i].module_id).in;
    for (int64_t j = 0; j < row_size; ++j) {
      if (j < a_size || !zero_b) values[i * row_size + j] = dist(rng);
    }
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  return {LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {n, row_size})),
          LoraConfig::from_rows(rows)};
}

// A LoRA table with `adapters` as slots 0, 1, ... (null: a slot that adapts nothing).
LoraTable table_of(const ModelConfig& config, const std::vector<const LoraAdapter*>& adapters) {
  LoraTable table(config);
  for (const LoraAdapter* a : adapters) a != nullptr ? table.add(*a) : table.add_none();
  return table;
}

// Logits [logits_indices, vocab].
std::vector<float> run_forward(LlamaModel& model, KvCache& cache, Batch& b,
                               const std::vector<const LoraAdapter*>& adapters = {}) {
  const int64_t rows = static_cast<int64_t>(b.logits_indices.size());
  std::vector<float> logits(rows * kVocab);
  model.forward(ExecContext::cpu(), b.view(), cache, table_of(model.config(), adapters),
                Tensor(logits.data(), DType::kFloat32, {rows, kVocab}));
  return logits;
}

// One row per supported module, mixing ranks and layers.
const std::vector<LoraConfigRow> kAdapterRows = {
    {lora_module::kAttnQkv, 1, 2},  {lora_module::kAttnQ, 0, 2},     {lora_module::kAttnK, 1, 4},
    {lora_module::kAttnV, 0, 4},    {lora_module::kAttnDense, 1, 8}, {lora_module::kMlpHTo4H, 0, 2},
    {lora_module::kMlp4HToH, 1, 4}, {lora_module::kMlpGate, 1, 8}};

class LlamaModelTest : public ::testing::Test {
 protected:
  LlamaModelTest()
      : config_(tiny_config()),
        model_(build_model(config_, random_checkpoint(config_))),
        cache_(config_, kNumBlocks, kBlockSize) {}

  std::vector<float> forward(Batch b, const std::vector<const LoraAdapter*>& adapters = {}) {
    return run_forward(*model_, cache_, b, adapters);
  }

  ModelConfig config_;
  std::unique_ptr<LlamaModel> model_;
  KvCache cache_;
};

TEST(ModelWeightsBuilderTest, RejectsUnknownNamesWrongShapesAndMissingTensors) {
  const ModelConfig config = tiny_config();
  ModelWeightsBuilder builder(config);
  std::vector<float> buf(kVocab * 48);
  auto add = [&](const char* name, const Tensor& t) {
    return [&builder, name, t] { builder.add(name, t); };
  };
  expect_error<InvalidArgument>(
      add("model.layers.2.mlp.up_proj.weight", Tensor(buf.data(), DType::kFloat32, {48, 32})),
      "checkpoint tensor 'model.layers.2.mlp.up_proj.weight' is not part "
      "of a LlamaForCausalLM model with this config.json (unexpected weight)");
  expect_error<InvalidArgument>(
      add("model.layers.0.self_attn.q_proj.bias", Tensor(buf.data(), DType::kFloat32, {32})),
      "checkpoint tensor 'model.layers.0.self_attn.q_proj.bias' is not part");
  expect_error<InvalidArgument>(
      add("model.layers.0.self_attn.k_proj.weight", Tensor(buf.data(), DType::kFloat32, {32, 32})),
      "checkpoint tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
      "[32, 32], config.json implies [16, 32]");
  expect_error<InvalidArgument>(add("model.norm.weight", Tensor(buf.data(), DType::kInt32, {32})),
                                "checkpoint tensor 'model.norm.weight' must be a contiguous host "
                                "float tensor, got [32] int32 cpu");

  Checkpoint ckpt = random_checkpoint(config);
  ckpt.erase("lm_head.weight");
  ckpt.erase("model.layers.1.mlp.down_proj.weight");
  for (auto& [name, param] : ckpt) builder.add(name, param.tensor());
  EXPECT_EQ(builder.missing(),
            (std::vector<std::string>{"lm_head.weight", "model.layers.1.mlp.down_proj.weight"}));
  expect_error<InvalidArgument>([&] { ModelWeights weights(std::move(builder)); },
                                "checkpoint is missing 2 tensor(s), first: 'lm_head.weight'");
}

TEST_F(LlamaModelTest, MalformedBatchesAreRejectedWithoutTouchingTheCache) {
  const Seq good{random_tokens(6, 1), 0, {5, 2}};
  const std::vector<float> before = forward(pack({good}));
  std::vector<char> snapshot(cache_.nbytes());
  std::memcpy(snapshot.data(), cache_.keys(0), snapshot.size());
  const AdapterData big = adapter_data(config_, {{lora_module::kAttnQ, 0, 16}});
  const LoraAdapter rank16(big.weights, big.config, config_, 16);

  // Each case breaks one field of a 6-token batch whose blocks are still empty.
  struct Case {
    std::function<void(Batch&)> mutate;
    std::string needle;
    std::vector<const LoraAdapter*> adapters;
  };
  const std::vector<Case> cases = {
      {[](Batch& b) { b = pack({{random_tokens(21, 3), 0, {20, 21, 22, 23, 24, 25}}}); },
       "batch has 21 tokens; it must have 1 to max_num_tokens = 20"},
      {[](Batch& b) { b.token_ids[2] = 64; },
       "token_ids[2] = 64 is out of range [0, vocab_size = 64)"},
      {[](Batch& b) { b.token_ids[0] = -1; }, "token_ids[0] = -1 is out of range"},
      {[](Batch& b) { b.seq_starts = {1, 6}; },
       "seq_starts must start at 0 and end at the token count 6"},
      {[](Batch& b) {
         b = pack({{random_tokens(2, 4), 0, {20}}, {random_tokens(4, 5), 0, {21}}});
         b.seq_starts = {0, 0, 6};
       },
       "seq_starts must increase: sequence 0 has no tokens"},
      // An inner start past the token count is refused before any per-token loop reads past T.
      {[](Batch& b) {
         b = pack({{random_tokens(2, 4), 0, {20}}, {random_tokens(4, 5), 0, {21}}});
         b.seq_starts = {0, 100, 6};
       },
       "seq_starts must increase: sequence 1 has no tokens"},
      {[](Batch& b) { b.lora_slots.push_back(-1); },
       "seq_starts must have S + 1 entries and context_lens, lora_slots, block_tables S rows (S = "
       "1)"},
      {[](Batch& b) { b.context_lens[0] = -1; }, "context_lens[0] = -1 is negative"},
      {[](Batch& b) { b.context_lens[0] = 4; },
       "block_tables row 0 has 2 blocks but positions up to 10 need 3 (block_size 4)"},
      {[](Batch& b) { b.block_tables[1] = 40; },
       "block_tables[0, 1] = 40 is out of range [0, num_kv_blocks = 40)"},
      {[](Batch& b) { b.lora_slots[0] = 0; },
       "lora_slots[0] = 0 names no loaded adapter (0 slot(s); -1 = base model)"},
      {[](Batch& b) { b.lora_slots[0] = 1; },
       "lora_slots[0] = 1 names no loaded adapter (1 slot(s)",
       {nullptr}},
      {[](Batch& b) { b.lora_slots[0] = -2; }, "lora_slots[0] = -2 names no loaded adapter"},
      {[](Batch& b) { b.positions[3] = 7; },
       "positions[3] = 7 but token 3 of sequence 0 sits at context_lens[0] + 3 = 3"},
      {[](Batch& b) { b.lora_slots[0] = 0; },
       "the LoRA table holds an adapter of rank 16, above max_lora_rank = 8",
       {&rank16}},
      {[](Batch& b) { b.logits_indices = {3, 6}; }, "logits_indices[1] = 6 is out of range [0, 6)"},
      {[](Batch& b) { b.logits_indices = {-1}; }, "logits_indices[0] = -1 is out of range [0, 6)"},
      // Positions past max_position_embeddings (2048), however many blocks the row lists.
      {[](Batch& b) { b.context_lens[0] = 2043; },
       "sequence 0: context_lens[0] = 2043 plus 6 token(s) reaches position 2049, past "
       "max_position_embeddings = 2048"},
      {[](Batch& b) { b.context_lens[0] = 2147483645; },
       "context_lens[0] = 2147483645 plus 6 token(s) reaches position 2147483651, past "
       "max_position_embeddings = 2048"},
      {[](Batch& b) {
         b = pack({{random_tokens(2, 4), 0, {20}}, {random_tokens(4, 5), 2046, {21}}});
       },
       "sequence 1: context_lens[1] = 2046 plus 4 token(s) reaches position 2050"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.needle);
    Batch b = pack({{random_tokens(6, 2), 0, {20, 21}}});
    c.mutate(b);
    expect_error<InvalidArgument>([&] { forward(b, c.adapters); }, c.needle);
    EXPECT_EQ(std::memcmp(snapshot.data(), cache_.keys(0), snapshot.size()), 0);
  }

  Batch b = pack({{random_tokens(6, 2), 0, {20, 21}}});
  std::vector<float> logits(kVocab);
  const Tensor narrow(logits.data(), DType::kFloat32, {1, kVocab - 1});
  expect_error<InvalidArgument>(
      [&] { model_->forward(ExecContext::cpu(), b.view(), cache_, LoraTable(config_), narrow); },
      "logits must be contiguous float32 [1, 64], got [1, 63] float32 cpu");
  // The attention kernel takes the table width as int32. validate() refuses the width before it
  // reads a row, so a view claiming 2^31 columns over 2 ints is enough to show it.
  ForwardBatch wide_table = b.view();
  wide_table.block_tables = Tensor(b.block_tables.data(), DType::kInt32, {1, int64_t{1} << 31});
  expect_error<InvalidArgument>(
      [&] {
        model_->forward(ExecContext::cpu(), wide_table, cache_, LoraTable(config_),
                        Tensor(logits.data(), DType::kFloat32, {1, kVocab}));
      },
      "block_tables has 2147483648 columns; at most 2147483647");
  ForwardBatch wide_ids = b.view();
  std::vector<int64_t> ids64(6);
  wide_ids.token_ids = Tensor(ids64.data(), DType::kInt64, {6});
  expect_error<InvalidArgument>(
      [&] {
        model_->forward(ExecContext::cpu(), wide_ids, cache_, LoraTable(config_),
                        Tensor(logits.data(), DType::kFloat32, {1, kVocab}));
      },
      "token_ids must be a contiguous host int32 tensor with 1 dim(s), got [6] int64 cpu");
  EXPECT_EQ(std::memcmp(snapshot.data(), cache_.keys(0), snapshot.size()), 0);

  const std::vector<float> after = forward(pack({good}));
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], before[i]) << i;
}

// The extra rows would be copied past the end of the normed_ workspace (ASan: heap overflow).
TEST_F(LlamaModelTest, MoreLogitsRowsThanMaxNumTokensAreRejected) {
  Batch b = pack({{random_tokens(4, 1), 0, {0}}});
  b.logits_indices.assign(kMaxTokens + 1, 0);
  expect_error<InvalidArgument>([&] { forward(b); }, "logits_indices");
}

// Issue 8: positions are int32 in the kernels. With max_position_embeddings at the int32 limit
// and a block table long enough for the positions, context_len + tokens past INT32_MAX used to
// pass validation and wrap to negative positions (segfault in the attention). Now validate()
// refuses it and the cache is untouched.
TEST(LlamaModelPositionsTest, PositionsPastInt32AreRefused) {
  ModelConfig config = tiny_config();
  config.max_position_embeddings = ModelConfig::kMaxDim;
  auto model = build_model(config, random_checkpoint(config));
  KvCache cache(config, 2, 1024);
  const int32_t context = ModelConfig::kMaxDim - 2;
  const int64_t blocks = (int64_t{context} + 6 + 1023) / 1024;
  Batch b = pack({{random_tokens(6, 9), context, std::vector<int32_t>(blocks, 0)}});
  std::vector<float> logits(kVocab);
  expect_error<InvalidArgument>(
      [&] {
        model->forward(ExecContext::cpu(), b.view(), cache, LoraTable(config),
                       Tensor(logits.data(), DType::kFloat32, {1, kVocab}));
      },
      "context_lens[0] = 2147483645 plus 6 token(s) reaches position 2147483651, past "
      "max_position_embeddings = 2147483647");
  for (size_t i = 0; i < cache.nbytes() / sizeof(float); ++i)
    ASSERT_EQ(static_cast<const float*>(cache.keys(0))[i], 0.0f);
}

TEST_F(LlamaModelTest, AdapterOfAnotherModelShapeIsRefused) {
  // Same module dims, one layer fewer: its (layer, module) table has no row for layer 1.
  ModelConfig shallow = config_;
  shallow.num_layers = 1;
  const AdapterData data = adapter_data(shallow, {{lora_module::kAttnQ, 0, 2}});
  const LoraAdapter adapter(data.weights, data.config, shallow, kMaxRank);
  EXPECT_FALSE(adapter.fits(config_));
  EXPECT_TRUE(adapter.fits(shallow));
  Batch b = pack({{random_tokens(3, 1), 0, {0}, 0}});
  expect_error<InvalidArgument>(
      [&] { forward(b, {&adapter}); },
      "the adapter was laid out for a model of another shape (1 layers, hidden 32, "
      "intermediate 48, q 32, kv 16, vocab 64; this model: 2 layers, hidden 32, intermediate 48, "
      "q 32, kv 16, vocab 64)");
}

TEST(LlamaModelWeightsTest, WeightsOfAnotherConfigAreRefused) {
  const ModelConfig c = tiny_config();
  ModelWeightsBuilder builder(c);
  Checkpoint ckpt = random_checkpoint(c);
  for (auto& [name, param] : ckpt) builder.add(name, param.tensor());
  ModelConfig deeper = c;
  deeper.num_layers = 3;  // would index a layer the weights do not have
  expect_error<InvalidArgument>(
      [&] { LlamaModel model(deeper, ModelWeights(std::move(builder)), kMaxTokens, kMaxRank); },
      "the weights were built for another model config (2 layers, vocab 64, hidden 32); this "
      "config has 3 layers");
}

TEST(LlamaModelWorkspaceTest, LimitsAreCheckedBeforeAllocating) {
  const ModelConfig config = tiny_config();
  // [t, 32] x 3, qkv [t, 64], attn [t, 32], gate_up + act [t, 144], LoRA [t, rank], then the
  // per-token LoRA run bookkeeping (12 bytes), and 4 rotary frequencies.
  const size_t per_token = (3 * 32 + 64 + 32 + 144 + 8) * 4 + 12;
  EXPECT_EQ(LlamaModel::workspace_bytes(config, 20, 8), 20 * per_token + 16);
  for (int64_t tokens : {int64_t{0}, int64_t{-3}, int64_t{1} << 31}) {
    expect_error<InvalidArgument>(
        [&] { LlamaModel::workspace_bytes(config, tokens, 8); },
        "max_num_tokens must be in [1, 2147483647] (token indices are int32), got " +
            std::to_string(tokens));
  }
  for (int64_t rank : {int64_t{0}, int64_t{1} << 31}) {
    expect_error<InvalidArgument>(
        [&] { LlamaModel::workspace_bytes(config, 20, rank); },
        "max_lora_rank must be in [1, 2147483647], got " + std::to_string(rank));
  }
  expect_error<InvalidArgument>(
      [&] { LlamaModel::workspace_bytes(config, ModelConfig::kMaxDim, 8); },
      "cannot allocate the LlamaModel workspace (max_num_tokens = 2147483647, max_lora_rank = 8)");
  // A valid config whose rows are wide enough that max_num_tokens of them overflow.
  ModelConfig wide = testing_util::llama_config(1, int64_t{1} << 30, 1, 1, 1, 1, 2);
  expect_error<InvalidArgument>(
      [&] { LlamaModel::workspace_bytes(wide, ModelConfig::kMaxDim, 8); },
      "LlamaModel workspace bytes (max_num_tokens * bytes per token) = 2147483647 * ");
  wide = config;
  wide.vocab_size = ModelConfig::kMaxDim;
  expect_error<InvalidArgument>(
      [&] { LlamaModel::workspace_bytes(wide, ModelConfig::kMaxDim, 8); },
      "logits bytes (max_num_tokens * vocab_size * 4) = 2147483647 * 2147483647 * 4 overflows");
  // The constructor refuses the same before it allocates anything.
  ModelWeightsBuilder builder(config);
  for (auto& [name, param] : random_checkpoint(config)) builder.add(name, param.tensor());
  expect_error<InvalidArgument>(
      [&] { LlamaModel(config, ModelWeights(std::move(builder)), ModelConfig::kMaxDim, 8); },
      "cannot allocate the LlamaModel workspace (max_num_tokens = 2147483647");
}

TEST_F(LlamaModelTest, IncrementalDecodingMatchesFullPrefill) {
  const std::vector<int32_t> ids = random_tokens(10, 3);
  const std::vector<float> full = forward(pack({{ids, 0, {7, 1, 12}}}, /*all_logits=*/true));
  // Same tokens in other blocks: a 4-token prefill, then one decode step per token, crossing
  // two block boundaries.
  const std::vector<int32_t> blocks = {30, 4, 19};
  const std::vector<int32_t> head(ids.begin(), ids.begin() + 4);
  expect_rows_near(forward(pack({{head, 0, blocks}}, true)), 0, full, 0, 4);
  for (int32_t n = 4; n < 10; ++n) {
    SCOPED_TRACE(n);
    expect_rows_near(forward(pack({{{ids[n]}, n, blocks}})), 0, full, n);
  }
}

TEST_F(LlamaModelTest, SequenceLogitsDoNotDependOnPackingOrBlockPlacement) {
  const std::vector<int32_t> a = random_tokens(7, 4), b = random_tokens(5, 5);
  const std::vector<float> alone = forward(pack({{a, 0, {0, 1}}}, true));
  const std::vector<float> packed = forward(pack({{b, 0, {2, 3}}, {a, 0, {9, 6}}}, true));
  for (int64_t t = 0; t < 7; ++t) expect_rows_near(packed, 5 + t, alone, t);

  const std::vector<float> step_alone = forward(pack({{{17}, 7, {0, 1}}}));
  const std::vector<float> step_packed = forward(pack({{{17}, 7, {9, 6}}, {{40}, 5, {2, 3}}}));
  expect_rows_near(step_packed, 0, step_alone);
}

// W + B @ A for every adapted module, so a base model with these weights must match the adapter.
Checkpoint merged_checkpoint(const ModelConfig& c, const AdapterData& adapter) {
  static const std::map<int32_t, std::vector<std::string>> kTargets = {
      {lora_module::kAttnQkv, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
      {lora_module::kAttnQ, {"self_attn.q_proj"}},
      {lora_module::kAttnK, {"self_attn.k_proj"}},
      {lora_module::kAttnV, {"self_attn.v_proj"}},
      {lora_module::kAttnDense, {"self_attn.o_proj"}},
      {lora_module::kMlpHTo4H, {"mlp.gate_proj"}},
      {lora_module::kMlp4HToH, {"mlp.down_proj"}},
      {lora_module::kMlpGate, {"mlp.up_proj"}}};
  Checkpoint ckpt = random_checkpoint(c);
  for (int64_t i = 0; i < adapter.config.num_rows(); ++i) {
    const LoraConfigRow row = adapter.config.row(i);
    const LoraModuleDims d = c.lora_module_dims(row.module_id);
    const int64_t r = row.adapter_size;
    int64_t out_row = 0;  // attn_qkv's B rows run through q, then k, then v
    for (const std::string& target : kTargets.at(row.module_id)) {
      Param& w =
          ckpt.at("model.layers." + std::to_string(row.layer_idx) + "." + target + ".weight");
      for (int64_t o = 0; o < w.shape[0]; ++o, ++out_row) {
        for (int64_t k = 0; k < d.in; ++k) {
          double delta = 0.0;
          for (int64_t j = 0; j < r; ++j) {
            delta += double{adapter.weights.value(i, r * d.in + out_row * r + j)} *
                     adapter.weights.value(i, j * d.in + k);
          }
          w.values[o * d.in + k] += static_cast<float>(delta);
        }
      }
    }
  }
  return ckpt;
}

TEST_F(LlamaModelTest, AdapterBatchMatchesMergedWeightsAndEachSequenceAlone) {
  const AdapterData data = adapter_data(config_, kAdapterRows);
  const LoraAdapter adapter(data.weights, data.config, config_, kMaxRank);
  const AdapterData zero_data = adapter_data(config_, kAdapterRows, /*zero_b=*/true);
  const LoraAdapter zero_b(zero_data.weights, zero_data.config, config_, kMaxRank);
  // x and z are neighbours with one adapter, so they share a 17-token segment of the LoRA GEMM;
  // the base-model y separates w, a 1-token segment.
  const std::vector<Seq> seqs = {{random_tokens(16, 6), 0, {0, 1, 2, 3}, 0},
                                 {{9}, 0, {4}, 0},
                                 {random_tokens(2, 7), 0, {5}, -1},
                                 {{33}, 0, {6}, 0}};
  std::vector<Seq> base_seqs = seqs;
  for (Seq& s : base_seqs) s.slot = -1;
  const std::vector<float> base = forward(pack(base_seqs));
  const std::vector<float> lora = forward(pack(seqs), {&adapter});
  const std::vector<float> zero = forward(pack(seqs), {&zero_b});
  for (size_t i = 0; i < base.size(); ++i) EXPECT_EQ(zero[i], base[i]) << i;

  auto merged = build_model(config_, merged_checkpoint(config_, data));
  KvCache cache(config_, kNumBlocks, kBlockSize);
  Batch merged_batch = pack(base_seqs);
  const std::vector<float> want = run_forward(*merged, cache, merged_batch);
  for (int64_t s = 0; s < 4; ++s) {
    SCOPED_TRACE(s);
    float max_diff = 0.0f;
    for (int64_t i = 0; i < kVocab; ++i) {
      max_diff = std::max(max_diff, std::abs(lora[s * kVocab + i] - base[s * kVocab + i]));
    }
    if (s == 2) {
      expect_rows_near(lora, s, base, s);
    } else {
      EXPECT_GT(max_diff, 0.1f);
      expect_rows_near(lora, s, want, s, 1, 1e-4);
    }
    // Slot 1 alone: slots index the adapter list.
    Seq alone = seqs[s];
    alone.slot = alone.slot < 0 ? -1 : 1;
    expect_rows_near(lora, s, forward(pack({alone}), {nullptr, &adapter}));
  }
}

// A sequence computed as one prefill, token by token, or in chunks next to other sequences (what
// recompute after preemption does) writes bitwise the same K/V and gets bitwise the same logits.
TEST(LlamaModelInvarianceTest, KvAndLogitsAreBitwiseTheSameWhateverTheChunking) {
  const ModelConfig c = tiny_config();
  ModelWeightsBuilder builder(c);
  Checkpoint ckpt = random_checkpoint(c);
  for (auto& [name, param] : ckpt) builder.add(name, param.tensor());
  LlamaModel model(c, ModelWeights(std::move(builder)), /*max_num_tokens=*/64, kMaxRank);
  KvCache cache(c, kNumBlocks, kBlockSize);
  const AdapterData data = adapter_data(c, kAdapterRows);
  const LoraAdapter adapter(data.weights, data.config, c, kMaxRank);
  const std::vector<int32_t> ids = random_tokens(30, 8), other = random_tokens(19, 9);
  const std::vector<int32_t> other_blocks = {35, 36, 37, 38, 39};
  const int64_t kv_width = c.num_kv_heads * c.head_dim;

  struct Result {
    std::vector<float> logits, kv;  // [30, vocab]; [layers, K/V, 30, kv_width]
  };
  // Chunk boundaries `cuts`; every chunk shares its forward with a prefill of `other` (so every
  // GEMM has more than 16 rows) and runs under the adapter, in blocks [first, first + 8).
  auto run = [&](const std::vector<int32_t>& cuts, int32_t first) {
    std::vector<int32_t> blocks(8);
    for (int32_t i = 0; i < 8; ++i) blocks[i] = first + i;
    std::vector<int32_t> bounds = {0};
    bounds.insert(bounds.end(), cuts.begin(), cuts.end());
    bounds.push_back(30);
    Result r;
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      const std::vector<int32_t> chunk(ids.begin() + bounds[i], ids.begin() + bounds[i + 1]);
      Batch b = pack({{other, 0, other_blocks, 0}, {chunk, bounds[i], blocks, 0}}, true);
      const std::vector<float> logits = run_forward(model, cache, b, {&adapter});
      r.logits.insert(r.logits.end(), logits.begin() + other.size() * kVocab, logits.end());
    }
    for (int64_t layer = 0; layer < c.num_layers; ++layer) {
      for (const void* raw : {cache.keys(layer), cache.values(layer)}) {
        const auto* base = static_cast<const float*>(raw);
        for (int32_t pos = 0; pos < 30; ++pos) {
          const int64_t slot = int64_t{blocks[pos / kBlockSize]} * kBlockSize + pos % kBlockSize;
          r.kv.insert(r.kv.end(), base + slot * kv_width, base + (slot + 1) * kv_width);
        }
      }
    }
    return r;
  };
  const Result whole = run({}, 0);
  std::vector<int32_t> every_token(29);
  for (int32_t i = 0; i < 29; ++i) every_token[i] = i + 1;
  for (const auto& [name, cuts] : std::vector<std::pair<const char*, std::vector<int32_t>>>{
           {"decode", every_token}, {"chunks 17/13", {17}}, {"chunks 3/1/16/10", {3, 4, 20}}}) {
    const Result got = run(cuts, 8);
    ASSERT_EQ(got.logits.size(), whole.logits.size());
    EXPECT_EQ(0, std::memcmp(got.kv.data(), whole.kv.data(), whole.kv.size() * sizeof(float)))
        << name << ": K/V differ";
    EXPECT_EQ(
        0, std::memcmp(got.logits.data(), whole.logits.data(), whole.logits.size() * sizeof(float)))
        << name << ": logits differ";
  }
}

// Weights stored in bfloat16 or float16 give bitwise the logits of the float32 path on a float32
// copy of the same values: the kernels widen exactly as they read and sum in the float32 order.
// Covers every weight kind (embedding, norms, fused qkv / gate_up, o and down, biases, lm_head),
// an adapter and a mixed batch of prefill chunks and decode tokens.
class LlamaModelDtypeTest : public ::testing::TestWithParam<DType> {};

INSTANTIATE_TEST_SUITE_P(StorageDtypes, LlamaModelDtypeTest,
                         ::testing::Values(DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST_P(LlamaModelDtypeTest, SixteenBitWeightsGiveTheFloat32PathsLogitsBitwise) {
  const DType dtype = GetParam();
  ModelConfig c = tiny_config();
  c.attention_bias = true;  // Llama's attention_bias: q, k, v and o biases
  Checkpoint ckpt = random_checkpoint(c);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-0.1f, 0.1f);
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    for (const auto& [name, n] : std::vector<std::pair<std::string, int64_t>>{
             {"q_proj.bias", q}, {"k_proj.bias", kv}, {"v_proj.bias", kv}, {"o_proj.bias", 32}}) {
      std::vector<float> values(n);
      for (float& v : values) v = dist(rng);
      ckpt[p + name] = Param{{n}, std::move(values)};
    }
  }
  // The values of the 16-bit checkpoint, held in float32 for the reference model.
  for (auto& [name, param] : ckpt) {
    std::vector<uint16_t> words(param.values.size());
    convert_floats(param.values.data(), DType::kFloat32, words.data(), dtype, words.size());
    convert_floats(words.data(), dtype, param.values.data(), DType::kFloat32, words.size());
  }
  const auto reference = build_model(c, ckpt);
  ModelWeightsBuilder builder(c, dtype);
  std::vector<std::vector<uint16_t>> storage;
  for (auto& [name, param] : ckpt) {  // handed over as 16-bit tensors, as a checkpoint holds them
    storage.emplace_back(param.values.size());
    convert_floats(param.values.data(), DType::kFloat32, storage.back().data(), dtype,
                   param.values.size());
    const int64_t* s = param.shape.data();
    builder.add(name, param.shape.size() == 1 ? Tensor(storage.back().data(), dtype, {s[0]})
                                              : Tensor(storage.back().data(), dtype, {s[0], s[1]}));
  }
  LlamaModel model(c, ModelWeights(std::move(builder)), kMaxTokens, kMaxRank);
  EXPECT_EQ(model.weight_dtype(), dtype);
  EXPECT_EQ(model.weight_bytes() * 2, reference->weight_bytes());

  const AdapterData data = adapter_data(c, kAdapterRows);
  const LoraAdapter adapter(data.weights, data.config, c, kMaxRank);
  KvCache cache_a(c, kNumBlocks, kBlockSize), cache_b(c, kNumBlocks, kBlockSize);
  // A prefill, then a mixed step: a decode token under the adapter and a new base prefill.
  const std::vector<int32_t> ids = random_tokens(9, 4), other = random_tokens(6, 5);
  for (const auto& seqs : std::vector<std::vector<Seq>>{
           {{ids, 0, {0, 1, 2}, 0}}, {{{17}, 9, {0, 1, 2}, 0}, {other, 0, {5, 6}, -1}}}) {
    Batch a = pack(seqs, /*all_logits=*/true), b = pack(seqs, true);
    const std::vector<float> want = run_forward(*reference, cache_a, a, {&adapter});
    const std::vector<float> got = run_forward(model, cache_b, b, {&adapter});
    ASSERT_EQ(want.size(), got.size());
    EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)));
  }
  EXPECT_EQ(0, std::memcmp(cache_a.keys(0), cache_b.keys(0), cache_a.nbytes()));
}

// --- Adapters with their own embedding tables, lm_head, vocabulary; DoRA (issue 11) -------------

using P = LoraEmbeddings;
using Parts = std::array<P::Input, P::kNumParts>;

constexpr int64_t kWide = 80;  // the extended adapter's vocabulary
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

const std::map<int32_t, std::vector<std::string>>& module_targets() {
  static const std::map<int32_t, std::vector<std::string>> kTargets = {
      {lora_module::kAttnQkv, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
      {lora_module::kAttnQ, {"self_attn.q_proj"}},
      {lora_module::kAttnK, {"self_attn.k_proj"}},
      {lora_module::kAttnV, {"self_attn.v_proj"}},
      {lora_module::kAttnDense, {"self_attn.o_proj"}},
      {lora_module::kMlpHTo4H, {"mlp.gate_proj"}},
      {lora_module::kMlp4HToH, {"mlp.down_proj"}},
      {lora_module::kMlpGate, {"mlp.up_proj"}}};
  return kTargets;
}

// The tiny model with q/k/v/o biases (DoRA must keep the bias out of its scale).
ModelConfig biased_config() {
  ModelConfig c = tiny_config();
  c.attention_bias = true;
  return c;
}

Checkpoint checkpoint_of(const ModelConfig& c) {
  Checkpoint ckpt = random_checkpoint(c);
  if (c.tie_word_embeddings) ckpt.erase("lm_head.weight");
  if (c.attention_bias) {
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> dist(-0.1f, 0.1f);
    const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
      for (const auto& [name, n] : std::vector<std::pair<std::string, int64_t>>{
               {"q_proj.bias", q}, {"k_proj.bias", kv}, {"v_proj.bias", kv}, {"o_proj.bias", 32}}) {
        std::vector<float> values(n);
        for (float& v : values) v = dist(rng);
        ckpt[p + name] = Param{{n}, std::move(values)};
      }
    }
  }
  return ckpt;
}

P::Input owned(int64_t rows, int64_t cols, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  auto values = std::make_shared<std::vector<float>>(
      testing_util::random_floats(static_cast<size_t>(rows * cols), seed, lo, hi));
  return {Tensor(values->data(), DType::kFloat32, {rows, cols}), values};
}
const float* values_of(const P::Input& in) { return in.tensor.data_as<const float>(); }

LoraWeights with_parts(const LoraWeights& rows, const Parts& parts) {
  return LoraWeights(rows.tensor(), rows.owner(), std::make_shared<const LoraEmbeddings>(parts));
}
LoraWeights parts_only(const Parts& parts) {
  return LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                     std::make_shared<const LoraEmbeddings>(parts));
}

// W += B @ A for each row of the adapter (DoRA rows: W = m / ||W + B A|| * (W + B A) per
// output row), in float64, on `ckpt`'s HF tensors: the merged model an adapter must match.
void merge_rows(Checkpoint& ckpt, const ModelConfig& c, const LoraWeights& w,
                const LoraConfig& config) {
  for (int64_t i = 0; i < config.num_rows(); ++i) {
    const LoraConfigRow row = config.row(i);
    const LoraModuleDims d = c.lora_module_dims(row.module_id);
    const int64_t r = row.adapter_size;
    std::vector<float*> out_rows;  // the module's output rows, through the targets
    for (const std::string& t : module_targets().at(row.module_id)) {
      Param& p = ckpt.at("model.layers." + std::to_string(row.layer_idx) + "." + t + ".weight");
      for (int64_t o = 0; o < p.shape[0]; ++o) out_rows.push_back(p.values.data() + o * d.in);
    }
    ASSERT_EQ(static_cast<int64_t>(out_rows.size()), d.out);
    for (int64_t o = 0; o < d.out; ++o) {
      std::vector<double> merged(d.in);
      double sum = 0.0;
      for (int64_t k = 0; k < d.in; ++k) {
        merged[k] = out_rows[o][k];
        for (int64_t j = 0; j < r; ++j) {
          merged[k] += double{w.value(i, r * d.in + o * r + j)} * w.value(i, j * d.in + k);
        }
        sum += merged[k] * merged[k];
      }
      const double scale = row.is_dora ? w.value(i, r * (d.in + d.out) + o) / std::sqrt(sum) : 1.0;
      for (int64_t k = 0; k < d.in; ++k) out_rows[o][k] = static_cast<float>(scale * merged[k]);
    }
  }
}

// A DoRA adapter on all 7 projections with mixed ranks (and a plain row): magnitudes chosen as
// ||W + B A|| times a factor in [0.6, 1.4), so each row's scale is that factor.
AdapterData dora_adapter(const ModelConfig& c, const Checkpoint& base) {
  const std::vector<LoraConfigRow> rows = {
      {lora_module::kAttnQ, 0, 2, 1},    {lora_module::kAttnK, 1, 4, 1},
      {lora_module::kAttnV, 0, 1, 1},    {lora_module::kAttnDense, 1, 8, 1},
      {lora_module::kMlpHTo4H, 0, 2, 1}, {lora_module::kMlpGate, 1, 4, 1},
      {lora_module::kMlp4HToH, 0, 8, 1}, {lora_module::kAttnQ, 1, 2, 0}};
  const int64_t row_size = 8 * (48 + 32) + 32;
  std::vector<float> values(rows.size() * row_size, 0.0f);
  for (size_t i = 0; i < rows.size(); ++i) {
    const LoraModuleDims d = c.lora_module_dims(rows[i].module_id);
    const int64_t r = rows[i].adapter_size;
    float* v = values.data() + i * row_size;
    const std::vector<float> ab =
        testing_util::random_floats(r * (d.in + d.out), 300 + i, -0.2f, 0.2f);
    std::copy(ab.begin(), ab.end(), v);
    if (!rows[i].is_dora) continue;
    const std::vector<float> factor = testing_util::random_floats(d.out, 400 + i, 0.6f, 1.4f);
    Checkpoint merged = base;
    const LoraWeights one = LoraWeights::copy_of(Tensor(v, DType::kFloat32, {1, row_size}));
    LoraConfigRow plain = rows[i];
    plain.is_dora = 0;
    merge_rows(merged, c, one, LoraConfig::from_rows({plain}));
    int64_t o = 0;
    for (const std::string& t : module_targets().at(rows[i].module_id)) {
      const Param& p =
          merged.at("model.layers." + std::to_string(rows[i].layer_idx) + "." + t + ".weight");
      for (int64_t po = 0; po < p.shape[0]; ++po, ++o) {
        double sum = 0.0;
        for (int64_t k = 0; k < d.in; ++k)
          sum += double{p.values[po * d.in + k]} * p.values[po * d.in + k];
        v[r * (d.in + d.out) + o] = static_cast<float>(std::sqrt(sum) * factor[o]);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  return {LoraWeights::copy_of(Tensor(values.data(), DType::kFloat32, {n, row_size})),
          LoraConfig::from_rows(rows)};
}

// Logits [logits_indices, width] of a base-only forward of a model of vocabulary `width`.
std::vector<float> run_forward_wide_base(LlamaModel& model, KvCache& cache, Batch& b,
                                         int64_t width) {
  const int64_t rows = static_cast<int64_t>(b.logits_indices.size());
  std::vector<float> logits(rows * width);
  model.forward(ExecContext::cpu(), b.view(), cache, LoraTable(model.config()),
                Tensor(logits.data(), DType::kFloat32, {rows, width}));
  return logits;
}

// Logits [logits_indices, model.logits_width(table)] of a forward with `adapters`.
std::vector<float> forward_wide(LlamaModel& model, KvCache& cache, Batch& b,
                                const std::vector<const LoraAdapter*>& adapters) {
  const LoraTable table = table_of(model.config(), adapters);
  const int64_t rows = static_cast<int64_t>(b.logits_indices.size());
  const int64_t width = model.logits_width(table);
  std::vector<float> logits(rows * width);
  model.forward(ExecContext::cpu(), b.view(), cache, table,
                Tensor(logits.data(), DType::kFloat32, {rows, width}));
  return logits;
}

// Columns [0, n) of `count` rows of `got` (width gw, from row g0) against `want` (width ww, from
// w0), relative to max(1, |want|).
void expect_block_near(const std::vector<float>& got, int64_t gw, int64_t g0,
                       const std::vector<float>& want, int64_t ww, int64_t w0, int64_t count,
                       int64_t n, double tol) {
  for (int64_t row = 0; row < count; ++row) {
    for (int64_t i = 0; i < n; ++i) {
      const float w = want[(w0 + row) * ww + i];
      ASSERT_NEAR(got[(g0 + row) * gw + i], w, tol * std::max(1.0f, std::abs(w)))
          << "row " << g0 + row << " col " << i;
    }
  }
}

// Rows [g0, g0 + count) hold -inf in columns [from, width): not their tokens.
void expect_masked(const std::vector<float>& got, int64_t width, int64_t g0, int64_t count,
                   int64_t from) {
  for (int64_t row = g0; row < g0 + count; ++row) {
    for (int64_t i = from; i < width; ++i) {
      ASSERT_EQ(got[row * width + i], kNegInf) << "row " << row << " col " << i;
    }
  }
}

double max_diff(const std::vector<float>& a, int64_t aw, int64_t a0, const std::vector<float>& b,
                int64_t bw, int64_t b0, int64_t count, int64_t n) {
  double d = 0.0;
  for (int64_t row = 0; row < count; ++row) {
    for (int64_t i = 0; i < n; ++i) {
      d = std::max(d, std::abs(double{a[(a0 + row) * aw + i]} - b[(b0 + row) * bw + i]));
    }
  }
  return d;
}

// One batch of base sequences and three adapters: one with its own embed_tokens / lm_head over
// 80 tokens, one with LoRA on embed_tokens and lm_head (plus layer rows), one DoRA on every
// projection. Each adapter's rows match a model that holds the adapter merged into its weights
// (the replacement tables as its own, at vocab 80); base rows are bitwise those of a base-only
// forward; every row holds -inf past its own vocabulary.
TEST(LlamaModelEmbeddingsTest, MixedBatchMatchesEachAdaptersMergedModel) {
  const ModelConfig c = biased_config();
  const Checkpoint base_ckpt = checkpoint_of(c);
  auto model = build_model(c, base_ckpt);
  KvCache cache(c, kNumBlocks, kBlockSize);

  // T: replacement tables of 80 rows.
  Parts tables;
  tables[P::kEmbedTokens] = owned(kWide, 32, 21);
  tables[P::kLmHead] = owned(kWide, 32, 22, -0.3f, 0.3f);
  const LoraAdapter t(parts_only(tables), LoraConfig::from_rows({}), c, kMaxRank);
  // L: LoRA on embed_tokens (rank 4) and lm_head (rank 3), and on every layer module.
  Parts lora;
  lora[P::kEmbedLoraA] = owned(4, kVocab, 23, -0.5f, 0.5f);
  lora[P::kEmbedLoraB] = owned(32, 4, 24, -0.5f, 0.5f);
  lora[P::kLmHeadLoraA] = owned(3, 32, 25, -0.5f, 0.5f);
  lora[P::kLmHeadLoraB] = owned(kVocab, 3, 26, -0.5f, 0.5f);
  const AdapterData l_rows = adapter_data(c, kAdapterRows);
  const LoraWeights l_weights = with_parts(l_rows.weights, lora);
  const LoraAdapter l(l_weights, l_rows.config, c, kMaxRank);
  // D: DoRA, its scales taken against the model's weights.
  const AdapterData d_data = dora_adapter(c, base_ckpt);
  const std::vector<float> scales =
      dora_scales(ExecContext::cpu(), model->weights(), d_data.weights, d_data.config);
  const LoraAdapter d(d_data.weights, d_data.config, c, kMaxRank, &scales);
  EXPECT_EQ(model->logits_width(table_of(c, {&l, &d})), kVocab);
  EXPECT_EQ(model->logits_width(table_of(c, {&l, &t})), kWide);

  // Slots: T = 0, L = 1, D = 2. T's prompts use ids past the base vocabulary.
  const std::vector<Seq> seqs = {{{5, 17, 42}, 0, {0}, -1}, {{70, 3, 79, 64}, 0, {1}, 0},
                                 {{9, 33, 63}, 0, {2}, 1},  {{12, 50, 7}, 0, {3}, 2},
                                 {{60, 1}, 0, {4}, -1},     {{66, 2}, 0, {5}, 0},
                                 {{31, 8}, 0, {6}, 2}};
  const std::vector<int64_t> first = {0, 3, 7, 10, 13, 15, 17};  // each sequence's first row
  Batch mixed_batch = pack(seqs, /*all_logits=*/true);
  const std::vector<float> mixed = forward_wide(*model, cache, mixed_batch, {&t, &l, &d});
  ASSERT_EQ(mixed.size(), 19u * kWide);

  // Base rows: bitwise a forward where every sequence is a base one (ids of T's mapped below 64).
  std::vector<Seq> all_base = seqs;
  for (Seq& s : all_base) {
    s.slot = -1;
    for (int32_t& id : s.tokens) id %= kVocab;
  }
  Batch base_batch = pack(all_base, true);
  const std::vector<float> base = run_forward(*model, cache, base_batch);
  for (int64_t s : {0, 4}) {
    for (int64_t row = first[s]; row < first[s] + static_cast<int64_t>(seqs[s].tokens.size());
         ++row) {
      EXPECT_EQ(0, std::memcmp(&mixed[row * kWide], &base[row * kVocab], kVocab * sizeof(float)))
          << "base row " << row;
    }
    expect_masked(mixed, kWide, first[s], seqs[s].tokens.size(), kVocab);
  }
  // And of a forward of that sequence alone.
  Batch alone = pack({seqs[0]}, true);
  const std::vector<float> solo = run_forward(*model, cache, alone);
  EXPECT_EQ(0, std::memcmp(&mixed[0], &solo[0], kVocab * sizeof(float)));

  // T: the model with T's tables as its own, at vocab 80.
  {
    ModelConfig wide = c;
    wide.vocab_size = kWide;
    Checkpoint ckpt = base_ckpt;
    ckpt["model.embed_tokens.weight"] =
        Param{{kWide, 32},
              std::vector<float>(values_of(tables[P::kEmbedTokens]),
                                 values_of(tables[P::kEmbedTokens]) + kWide * 32)};
    ckpt["lm_head.weight"] = Param{{kWide, 32},
                                   std::vector<float>(values_of(tables[P::kLmHead]),
                                                      values_of(tables[P::kLmHead]) + kWide * 32)};
    auto reference = build_model(wide, ckpt);
    KvCache ref_cache(wide, kNumBlocks, kBlockSize);
    for (int64_t s : {1, 5}) {
      Seq own = seqs[s];
      own.slot = -1;
      Batch b = pack({own}, true);
      const std::vector<float> want = run_forward_wide_base(*reference, ref_cache, b, kWide);
      SCOPED_TRACE(s);
      expect_block_near(mixed, kWide, first[s], want, kWide, 0, own.tokens.size(), kWide, 1e-5);
    }
  }
  // L: embed' = embed + (B A)^T, lm_head' = lm_head + B A, layer rows merged.
  {
    Checkpoint ckpt = base_ckpt;
    merge_rows(ckpt, c, l_rows.weights, l_rows.config);
    Param& embed = ckpt.at("model.embed_tokens.weight");
    Param& head = ckpt.at("lm_head.weight");
    for (int64_t v = 0; v < kVocab; ++v) {
      for (int64_t h = 0; h < 32; ++h) {
        double e = embed.values[v * 32 + h], o = head.values[v * 32 + h];
        for (int64_t r = 0; r < 4; ++r) {
          e += double{values_of(lora[P::kEmbedLoraA])[r * kVocab + v]} *
               values_of(lora[P::kEmbedLoraB])[h * 4 + r];
        }
        for (int64_t r = 0; r < 3; ++r) {
          o += double{values_of(lora[P::kLmHeadLoraB])[v * 3 + r]} *
               values_of(lora[P::kLmHeadLoraA])[r * 32 + h];
        }
        embed.values[v * 32 + h] = static_cast<float>(e);
        head.values[v * 32 + h] = static_cast<float>(o);
      }
    }
    auto reference = build_model(c, ckpt);
    KvCache ref_cache(c, kNumBlocks, kBlockSize);
    Seq own = seqs[2];
    own.slot = -1;
    Batch b = pack({own}, true);
    const std::vector<float> want = run_forward(*reference, ref_cache, b);
    expect_block_near(mixed, kWide, first[2], want, kVocab, 0, 3, kVocab, 1e-4);
    EXPECT_GT(max_diff(mixed, kWide, first[2], base, kVocab, first[2], 3, kVocab), 0.1);
    expect_masked(mixed, kWide, first[2], 3, kVocab);
  }
  // D: W' = m / ||W + B A|| * (W + B A), biases as they are.
  {
    Checkpoint ckpt = base_ckpt;
    merge_rows(ckpt, c, d_data.weights, d_data.config);
    auto reference = build_model(c, ckpt);
    KvCache ref_cache(c, kNumBlocks, kBlockSize);
    for (int64_t s : {3, 6}) {
      SCOPED_TRACE(s);
      Seq own = seqs[s];
      own.slot = -1;
      Batch b = pack({own}, true);
      const std::vector<float> want = run_forward(*reference, ref_cache, b);
      const int64_t n = static_cast<int64_t>(own.tokens.size());
      expect_block_near(mixed, kWide, first[s], want, kVocab, 0, n, kVocab, 1e-4);
      EXPECT_GT(max_diff(mixed, kWide, first[s], base, kVocab, first[s], n, kVocab), 0.1);
      expect_masked(mixed, kWide, first[s], n, kVocab);
    }
  }
}

// Token ids are checked against each sequence's own vocabulary, before anything is written.
TEST(LlamaModelEmbeddingsTest, TokenIdsAreValidatedPerSequencesVocabulary) {
  const ModelConfig c = tiny_config();
  auto model = build_model(c, checkpoint_of(c));
  KvCache cache(c, kNumBlocks, kBlockSize);
  Parts tables;
  tables[P::kEmbedTokens] = owned(kWide, 32, 21);
  tables[P::kLmHead] = tables[P::kEmbedTokens];
  const LoraAdapter t(parts_only(tables), LoraConfig::from_rows({}), c, kMaxRank);
  const AdapterData plain = adapter_data(c, {{lora_module::kAttnQ, 0, 2}});
  const LoraAdapter l(plain.weights, plain.config, c, kMaxRank);
  const std::vector<char> snapshot(reinterpret_cast<const char*>(cache.keys(0)),
                                   reinterpret_cast<const char*>(cache.keys(0)) + cache.nbytes());
  struct Case {
    std::vector<Seq> seqs;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{{{1, 2}, 0, {0}, 0}, {{1, 70, 2}, 0, {1}, -1}},
       "token_ids[3] = 70 is out of range [0, vocab_size = 64) of sequence 1 (the base model)"},
      {{{{64}, 0, {0}, 1}},
       "token_ids[0] = 64 is out of range [0, vocab_size = 64) of sequence 0's adapter"},
      {{{{3}, 0, {0}, -1}, {{79, 80}, 0, {1}, 0}},
       "token_ids[2] = 80 is out of range [0, vocab_size = 80) of sequence 1's adapter"},
      {{{{-1}, 0, {0}, 0}}, "token_ids[0] = -1 is out of range [0, vocab_size = 80)"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.needle);
    Batch b = pack(k.seqs);
    expect_error<InvalidArgument>([&] { forward_wide(*model, cache, b, {&t, &l}); }, k.needle);
    EXPECT_EQ(0, std::memcmp(snapshot.data(), cache.keys(0), snapshot.size()));
  }
  // The adapter's own ids are fine, and the logits must be as wide as its vocabulary.
  Batch ok = pack({{{79, 64, 0}, 0, {0}, 0}});
  EXPECT_EQ(forward_wide(*model, cache, ok, {&t, &l}).size(), static_cast<size_t>(kWide));
  std::vector<float> narrow(kVocab);
  expect_error<InvalidArgument>(
      [&] {
        model->forward(ExecContext::cpu(), ok.view(), cache, table_of(c, {&t, &l}),
                       Tensor(narrow.data(), DType::kFloat32, {1, kVocab}));
      },
      "logits must be contiguous float32 [1, 80], got [1, 64] float32 cpu");
}

// Tied base (Llama-3.2): an adapter that keeps the tie (one table for both), one that unties
// (only embed_tokens: the output stays the base table) and one with LoRA on lm_head alone (the
// base's output table plus B A, the input table untouched), each against its merged model.
TEST(LlamaModelEmbeddingsTest, TiedBaseAdaptersKeepOrBreakTheTieAsPeftDoes) {
  ModelConfig c = tiny_config();
  c.tie_word_embeddings = true;
  const Checkpoint base_ckpt = checkpoint_of(c);
  ASSERT_EQ(base_ckpt.count("lm_head.weight"), 0u);
  auto model = build_model(c, base_ckpt);
  KvCache cache(c, kNumBlocks, kBlockSize);
  const std::vector<float>& embed = base_ckpt.at("model.embed_tokens.weight").values;

  Parts kept;
  kept[P::kEmbedTokens] = owned(72, 32, 31);
  kept[P::kLmHead] = kept[P::kEmbedTokens];
  const LoraAdapter tied(parts_only(kept), LoraConfig::from_rows({}), c, kMaxRank);
  EXPECT_EQ(tied.lm_head().data(), tied.embed_tokens().data());
  EXPECT_EQ(tied.nbytes(), 72u * 32 * 4);
  Parts untie;
  untie[P::kEmbedTokens] = owned(kVocab, 32, 32);
  const LoraAdapter untied(parts_only(untie), LoraConfig::from_rows({}), c, kMaxRank);
  EXPECT_FALSE(untied.lm_head().defined());
  Parts head_lora;
  head_lora[P::kLmHeadLoraA] = owned(2, 32, 33, -0.5f, 0.5f);
  head_lora[P::kLmHeadLoraB] = owned(kVocab, 2, 34, -0.5f, 0.5f);
  const LoraAdapter head(parts_only(head_lora), LoraConfig::from_rows({}), c, kMaxRank);

  const std::vector<Seq> seqs = {
      {{4, 71, 9}, 0, {0}, 0}, {{5, 6}, 0, {1}, -1}, {{7, 8, 9}, 0, {2}, 1}, {{10, 11}, 0, {3}, 2}};
  const std::vector<int64_t> first = {0, 3, 5, 8};
  Batch b = pack(seqs, true);
  const std::vector<float> mixed = forward_wide(*model, cache, b, {&tied, &untied, &head});
  ASSERT_EQ(mixed.size(), 10u * 72);

  auto reference_rows = [&](const ModelConfig& rc, const Checkpoint& ckpt, const Seq& s) {
    auto ref = build_model(rc, ckpt);
    KvCache ref_cache(rc, kNumBlocks, kBlockSize);
    Seq own = s;
    own.slot = -1;
    Batch rb = pack({own}, true);
    return run_forward_wide_base(*ref, ref_cache, rb, rc.vocab_size);
  };
  {  // kept tied: a tied model of vocabulary 72 whose table is the adapter's
    ModelConfig rc = c;
    rc.vocab_size = 72;
    Checkpoint ckpt = base_ckpt;
    ckpt["model.embed_tokens.weight"] =
        Param{{72, 32},
              std::vector<float>(values_of(kept[P::kEmbedTokens]),
                                 values_of(kept[P::kEmbedTokens]) + 72 * 32)};
    const std::vector<float> want = reference_rows(rc, ckpt, seqs[0]);
    expect_block_near(mixed, 72, first[0], want, 72, 0, 3, 72, 1e-5);
  }
  {  // base rows: the tied model itself, -inf past 64
    const std::vector<float> want = reference_rows(c, base_ckpt, seqs[1]);
    for (int64_t row = 0; row < 2; ++row) {
      EXPECT_EQ(0, std::memcmp(&mixed[(first[1] + row) * 72], &want[row * kVocab],
                               kVocab * sizeof(float)));
    }
    expect_masked(mixed, 72, first[1], 2, kVocab);
  }
  ModelConfig untied_config = c;
  untied_config.tie_word_embeddings = false;
  {  // untied: the adapter's input table, the base table as lm_head
    Checkpoint ckpt = base_ckpt;
    ckpt["model.embed_tokens.weight"] =
        Param{{kVocab, 32},
              std::vector<float>(values_of(untie[P::kEmbedTokens]),
                                 values_of(untie[P::kEmbedTokens]) + kVocab * 32)};
    ckpt["lm_head.weight"] = Param{{kVocab, 32}, embed};
    const std::vector<float> want = reference_rows(untied_config, ckpt, seqs[2]);
    expect_block_near(mixed, 72, first[2], want, kVocab, 0, 3, kVocab, 1e-5);
    expect_masked(mixed, 72, first[2], 3, kVocab);
  }
  {  // lm_head LoRA: lm_head' = embed + B A, embed_tokens untouched
    Checkpoint ckpt = base_ckpt;
    std::vector<float> out = embed;
    for (int64_t v = 0; v < kVocab; ++v) {
      for (int64_t h = 0; h < 32; ++h) {
        double o = out[v * 32 + h];
        for (int64_t r = 0; r < 2; ++r) {
          o += double{values_of(head_lora[P::kLmHeadLoraB])[v * 2 + r]} *
               values_of(head_lora[P::kLmHeadLoraA])[r * 32 + h];
        }
        out[v * 32 + h] = static_cast<float>(o);
      }
    }
    ckpt["lm_head.weight"] = Param{{kVocab, 32}, out};
    const std::vector<float> want = reference_rows(untied_config, ckpt, seqs[3]);
    expect_block_near(mixed, 72, first[3], want, kVocab, 0, 2, kVocab, 1e-4);
    expect_masked(mixed, 72, first[3], 2, kVocab);
  }
}

// LoRA on the tables of an extended vocabulary: embed_lora_a spans the adapter's 80 ids and
// lm_head_lora_b its 80 rows, on top of its own tables.
TEST(LlamaModelEmbeddingsTest, LoraOnAnExtendedVocabularysOwnTables) {
  const ModelConfig c = tiny_config();
  const Checkpoint base_ckpt = checkpoint_of(c);
  auto model = build_model(c, base_ckpt);
  KvCache cache(c, kNumBlocks, kBlockSize);
  Parts parts;
  parts[P::kEmbedTokens] = owned(kWide, 32, 41);
  parts[P::kLmHead] = owned(kWide, 32, 42, -0.3f, 0.3f);
  parts[P::kEmbedLoraA] = owned(3, kWide, 43, -0.5f, 0.5f);
  parts[P::kEmbedLoraB] = owned(32, 3, 44, -0.5f, 0.5f);
  parts[P::kLmHeadLoraA] = owned(2, 32, 45, -0.5f, 0.5f);
  parts[P::kLmHeadLoraB] = owned(kWide, 2, 46, -0.5f, 0.5f);
  const LoraAdapter a(parts_only(parts), LoraConfig::from_rows({}), c, kMaxRank);
  const std::vector<Seq> seqs = {{{1, 2, 3}, 0, {0}, -1}, {{79, 64, 5, 72}, 0, {1}, 0}};
  Batch b = pack(seqs, true);
  const std::vector<float> mixed = forward_wide(*model, cache, b, {&a});

  ModelConfig wide = c;
  wide.vocab_size = kWide;
  Checkpoint ckpt = base_ckpt;
  std::vector<float> embed(kWide * 32), head(kWide * 32);
  for (int64_t v = 0; v < kWide; ++v) {
    for (int64_t h = 0; h < 32; ++h) {
      double e = values_of(parts[P::kEmbedTokens])[v * 32 + h];
      double o = values_of(parts[P::kLmHead])[v * 32 + h];
      for (int64_t r = 0; r < 3; ++r) {
        e += double{values_of(parts[P::kEmbedLoraA])[r * kWide + v]} *
             values_of(parts[P::kEmbedLoraB])[h * 3 + r];
      }
      for (int64_t r = 0; r < 2; ++r) {
        o += double{values_of(parts[P::kLmHeadLoraB])[v * 2 + r]} *
             values_of(parts[P::kLmHeadLoraA])[r * 32 + h];
      }
      embed[v * 32 + h] = static_cast<float>(e);
      head[v * 32 + h] = static_cast<float>(o);
    }
  }
  ckpt["model.embed_tokens.weight"] = Param{{kWide, 32}, embed};
  ckpt["lm_head.weight"] = Param{{kWide, 32}, head};
  auto reference = build_model(wide, ckpt);
  KvCache ref_cache(wide, kNumBlocks, kBlockSize);
  Seq own = seqs[1];
  own.slot = -1;
  Batch rb = pack({own}, true);
  const std::vector<float> want = run_forward_wide_base(*reference, ref_cache, rb, kWide);
  expect_block_near(mixed, kWide, 3, want, kWide, 0, 4, kWide, 1e-4);
  expect_masked(mixed, kWide, 0, 3, kVocab);
}

// At bfloat16 precision the per-slot paths run the same matmuls as the model's own: base rows are
// bitwise a base-only forward, and an adapter's tables give bitwise the logits of a model that
// holds them.
TEST(LlamaModelEmbeddingsTest, Bfloat16PrecisionPerSlotPathsMatchTheModelsOwn) {
  const ModelConfig c = tiny_config();
  const Checkpoint base_ckpt = checkpoint_of(c);
  auto model = build_model(c, base_ckpt);
  KvCache cache(c, kNumBlocks, kBlockSize);
  Parts tables;
  tables[P::kEmbedTokens] = owned(kWide, 32, 51);
  tables[P::kLmHead] = owned(kWide, 32, 52, -0.3f, 0.3f);
  const LoraAdapter t(parts_only(tables), LoraConfig::from_rows({}), c, kMaxRank);
  const ExecContext bf16 = ExecContext::cpu(0, Precision::kBFloat16);
  const std::vector<Seq> seqs = {{{1, 2, 3, 4, 5}, 0, {0, 1}, -1}, {{79, 64, 5, 72}, 0, {2}, 0}};
  Batch b = pack(seqs, true);
  const LoraTable table = table_of(c, {&t});
  std::vector<float> mixed(9 * kWide);
  model->forward(bf16, b.view(), cache, table, Tensor(mixed.data(), DType::kFloat32, {9, kWide}));

  std::vector<Seq> base_seqs = seqs;
  base_seqs[1].slot = -1;
  for (int32_t& id : base_seqs[1].tokens) id %= kVocab;
  Batch bb = pack(base_seqs, true);
  std::vector<float> base(9 * kVocab);
  model->forward(bf16, bb.view(), cache, LoraTable(c),
                 Tensor(base.data(), DType::kFloat32, {9, kVocab}));
  for (int64_t row = 0; row < 5; ++row) {
    EXPECT_EQ(0, std::memcmp(&mixed[row * kWide], &base[row * kVocab], kVocab * sizeof(float)))
        << row;
  }
  expect_masked(mixed, kWide, 0, 5, kVocab);

  ModelConfig wide = c;
  wide.vocab_size = kWide;
  Checkpoint ckpt = base_ckpt;
  ckpt["model.embed_tokens.weight"] =
      Param{{kWide, 32},
            std::vector<float>(values_of(tables[P::kEmbedTokens]),
                               values_of(tables[P::kEmbedTokens]) + kWide * 32)};
  ckpt["lm_head.weight"] = Param{{kWide, 32},
                                 std::vector<float>(values_of(tables[P::kLmHead]),
                                                    values_of(tables[P::kLmHead]) + kWide * 32)};
  auto reference = build_model(wide, ckpt);
  KvCache ref_cache(wide, kNumBlocks, kBlockSize);
  Seq own = seqs[1];
  own.slot = -1;
  Batch rb = pack({own}, true);
  std::vector<float> want(4 * kWide);
  reference->forward(bf16, rb.view(), ref_cache, LoraTable(wide),
                     Tensor(want.data(), DType::kFloat32, {4, kWide}));
  expect_block_near(mixed, kWide, 5, want, kWide, 0, 4, kWide, 1e-6);
}

}  // namespace
}  // namespace lorart
