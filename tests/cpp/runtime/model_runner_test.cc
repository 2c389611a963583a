#include "runtime/model_runner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "core/errors.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

constexpr int64_t kVocab = 48, kBlocks = 8, kBlockSize = 4;

// `nan_norm`: a NaN in the final norm's weight, which makes every logit NaN.
std::shared_ptr<LlamaModel> tiny_model(bool nan_norm = false) {
  const ModelConfig c = testing_util::llama_config(kVocab, 16, 24, 1, 2, 1, 8);
  ModelWeightsBuilder builder(c);
  std::vector<std::vector<float>> storage;
  uint32_t seed = 1;
  testing_util::for_each_llama_param(c, [&](const std::string& name, std::vector<int64_t> shape,
                                            float lo, float hi) {
    storage.push_back(
        testing_util::random_floats(shape[0] * (shape.size() > 1 ? shape[1] : 1), seed++, lo, hi));
    if (nan_norm && name == "model.norm.weight") {
      storage.back()[0] = std::numeric_limits<float>::quiet_NaN();
    }
    builder.add(name, shape.size() == 1
                          ? Tensor(storage.back().data(), DType::kFloat32, {shape[0]})
                          : Tensor(storage.back().data(), DType::kFloat32, {shape[0], shape[1]}));
  });
  return std::make_shared<LlamaModel>(c, ModelWeights(std::move(builder)), 16, 8);
}

// The arrays of one step: two sequences prefilling 3 and 2 tokens, logits of every token.
struct Step {
  std::vector<int32_t> ids = {3, 9, 27, 5, 11}, positions = {0, 1, 2, 0, 1}, starts = {0, 3, 5},
                       ctx = {0, 0}, tables = {0, 1}, slots = {-1, -1}, picks = {0, 1, 2, 3, 4};
  std::vector<int32_t> sample_rows = {2, 4};
  std::vector<SamplingParams> sampling = {{1, 1.0f, 0.0f}, {0, 0.9f, 0.7f}};
  std::vector<uint64_t> rng = {11, 12};
  StepInput input(const LoraTable& lora) {
    auto v = [](std::vector<int32_t>& a) {
      return Tensor(a.data(), DType::kInt32, {static_cast<int64_t>(a.size())});
    };
    StepInput in;
    in.batch = {
        v(ids),   v(positions), v(starts), v(ctx), Tensor(tables.data(), DType::kInt32, {2, 1}),
        v(slots), v(picks)};
    in.lora = &lora;
    in.sample_rows = v(sample_rows);
    in.sampling = sampling.data();
    in.rng_states = rng.data();
    in.log_probs = true;
    return in;
  }
};

// run() is the model's forward followed by the sampling op, on the runner's own KV pool.
TEST(ModelRunnerTest, RunIsForwardThenSampling) {
  const auto model = tiny_model();
  ModelRunner runner(model, kBlocks, kBlockSize, ExecContext::cpu(1));
  EXPECT_EQ(runner.bind_thread(), 1);
  LoraTable lora(model->config());
  Step step;
  const StepOutput out = runner.run(step.input(lora));
  ASSERT_EQ(out.logits.shape_str(), "[5, 48]");
  ASSERT_EQ(out.tokens.numel(), 2);

  // The same step by hand.
  KvCache cache(model->config(), kBlocks, kBlockSize);
  Step ref;
  std::vector<float> logits(5 * kVocab);
  const Tensor logits_t(logits.data(), DType::kFloat32, {5, kVocab});
  model->forward(ExecContext::cpu(1), ref.input(lora).batch, cache, lora, logits_t);
  EXPECT_EQ(0, std::memcmp(logits.data(), out.logits.data(), logits.size() * sizeof(float)));
  std::vector<int32_t> tokens(2);
  std::vector<float> log_probs(2);
  std::vector<std::pair<float, int32_t>> scratch(kVocab);
  ops::sample(ExecContext::cpu(1), logits_t, Tensor(ref.sample_rows.data(), DType::kInt32, {2}),
              ref.sampling.data(), ref.rng.data(), Tensor(tokens.data(), DType::kInt32, {2}),
              Tensor(log_probs.data(), DType::kFloat32, {2}), scratch.data());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(out.tokens.data_as<int32_t>()[i], tokens[i]);
    EXPECT_EQ(out.log_probs.data_as<float>()[i], log_probs[i]);
    EXPECT_EQ(step.rng[i], ref.rng[i]);  // advanced alike
  }
  EXPECT_NE(step.rng[1], 12u);  // the sampled (not greedy) request drew from its RNG
  EXPECT_EQ(0, std::memcmp(cache.keys(0), runner.kv_cache().keys(0), cache.nbytes()));
}

TEST(ModelRunnerTest, RowsWithNonFiniteLogitsAreNotSampled) {
  const auto model = tiny_model(/*nan_norm=*/true);
  ModelRunner runner(model, kBlocks, kBlockSize, ExecContext::cpu());
  LoraTable lora(model->config());
  Step step;
  const StepOutput out = runner.run(step.input(lora));
  EXPECT_FALSE(std::isfinite(out.logits.data_as<float>()[2 * kVocab]));
  EXPECT_EQ(out.tokens.data_as<int32_t>()[0], -1);
  EXPECT_EQ(out.tokens.data_as<int32_t>()[1], -1);
  EXPECT_EQ(step.rng[1], 12u);  // untouched
}

TEST(ModelRunnerTest, MalformedStepsAreRefusedNamingTheField) {
  const auto model = tiny_model();
  ModelRunner runner(model, kBlocks, kBlockSize, ExecContext::cpu());
  LoraTable lora(model->config());
  Step step;
  step.sample_rows[1] = 5;
  expect_error<InvalidArgument>([&] { runner.run(step.input(lora)); },
                                "sample_rows[1] = 5 is out of range [0, 5)");
  // A logits row count past max_num_tokens is refused before any logits are allocated.
  Step many;
  many.picks.assign(100000, 0);
  expect_error<InvalidArgument>([&] { runner.run(many.input(lora)); },
                                "logits_indices asks for 100000 rows; at most max_num_tokens = 16");
  Step no_table;
  StepInput in = no_table.input(lora);
  in.lora = nullptr;
  expect_error<InvalidArgument>([&] { runner.run(in); }, "the step has no LoRA table");
  ExecContext cuda;
  cuda.device = Device::cuda();
  expect_error<InvalidArgument>(
      [&] { ModelRunner other(model, kBlocks, kBlockSize, cuda); },
      "ModelRunner: the context's device cuda:0 is not the model's (cpu)");
}

// A step whose table holds an adapter with its own 60-token tables: the logits are as wide as
// the widest vocabulary (buffers grow for it and serve narrower steps after), the base row is
// -inf past 48, and each row samples within its own vocabulary.
TEST(ModelRunnerTest, AWiderAdapterVocabularyWidensTheStep) {
  const auto model = tiny_model();
  ModelRunner runner(model, kBlocks, kBlockSize, ExecContext::cpu(1));
  const int64_t wide = 60;
  // Its own tables (tied), random: the runner must match the model's forward and the sampler.
  auto values = std::make_shared<std::vector<float>>(testing_util::random_floats(wide * 16, 5));
  std::array<LoraEmbeddings::Input, LoraEmbeddings::kNumParts> parts;
  parts[LoraEmbeddings::kEmbedTokens] = {Tensor(values->data(), DType::kFloat32, {wide, 16}),
                                         values};
  parts[LoraEmbeddings::kLmHead] = parts[LoraEmbeddings::kEmbedTokens];
  const LoraAdapter adapter(LoraWeights(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                                        std::make_shared<const LoraEmbeddings>(parts)),
                            LoraConfig::from_rows({}), model->config(), 8);
  LoraTable base_table(model->config()), wide_table(model->config());
  wide_table.add(adapter);

  Step narrow_first;
  ASSERT_EQ(runner.run(narrow_first.input(base_table)).logits.shape_str(), "[5, 48]");
  Step step;
  step.ids = {3, 9, 27, 5, 59};  // the second sequence's last id is the adapter's own
  step.slots = {-1, 0};
  step.sampling = {{1, 1.0f, 0.0f, kVocab}, {1, 1.0f, 0.0f, wide}};
  step.ctx = {0, 0};
  step.tables = {2, 3};
  const StepOutput out = runner.run(step.input(wide_table));
  ASSERT_EQ(out.logits.shape_str(), "[5, 60]");
  const float* l = out.logits.data_as<const float>();
  for (int64_t row = 0; row < 3; ++row) {
    for (int64_t i = kVocab; i < wide; ++i) {
      ASSERT_EQ(l[row * wide + i], -std::numeric_limits<float>::infinity()) << row << "," << i;
    }
  }
  // The same step by hand.
  KvCache cache(model->config(), kBlocks, kBlockSize);
  Step ref = step;
  std::vector<float> logits(5 * wide);
  const Tensor logits_t(logits.data(), DType::kFloat32, {5, wide});
  model->forward(ExecContext::cpu(1), ref.input(wide_table).batch, cache, wide_table, logits_t);
  EXPECT_EQ(0, std::memcmp(logits.data(), out.logits.data(), logits.size() * sizeof(float)));
  std::vector<int32_t> tokens(2);
  std::vector<std::pair<float, int32_t>> scratch(wide);
  ops::sample(ExecContext::cpu(1), logits_t, Tensor(ref.sample_rows.data(), DType::kInt32, {2}),
              ref.sampling.data(), ref.rng.data(), Tensor(tokens.data(), DType::kInt32, {2}),
              Tensor(), scratch.data());
  EXPECT_EQ(out.tokens.data_as<int32_t>()[0], tokens[0]);
  EXPECT_EQ(out.tokens.data_as<int32_t>()[1], tokens[1]);
  EXPECT_LT(tokens[0], kVocab);
  // Greedy over the adapter's 60 tokens is the argmax of its row.
  const float* row4 = logits.data() + 4 * wide;
  EXPECT_EQ(tokens[1], std::max_element(row4, row4 + wide) - row4);

  // A narrower step after it: the model's width again.
  Step after;
  after.tables = {4, 5};
  ASSERT_EQ(runner.run(after.input(base_table)).logits.shape_str(), "[5, 48]");
}

}  // namespace
}  // namespace lorart
