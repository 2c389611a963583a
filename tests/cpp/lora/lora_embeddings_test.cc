#include "lora/lora_embeddings.h"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <memory>
#include <vector>

#include "core/errors.h"
#include "lora/lora_tensors.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;
using P = LoraEmbeddings;
using Parts = std::array<P::Input, P::kNumParts>;

// A [rows, cols] float32 part owning its values (seeded random, so two calls with one seed hold
// equal bytes in different memory).
P::Input part(int64_t rows, int64_t cols, uint32_t seed) {
  auto values = std::make_shared<std::vector<float>>(
      testing_util::random_floats(static_cast<size_t>(rows * cols), seed));
  return {Tensor(values->data(), DType::kFloat32, {rows, cols}), values};
}

float at(const Tensor& t, int64_t i) {
  float v = 0.0f;
  convert_floats(static_cast<const char*>(t.data()) + i * dtype_size(t.dtype()), t.dtype(), &v,
                 DType::kFloat32, 1);
  return v;
}

TEST(LoraEmbeddingsTest, PartsMustBeContiguousTwoDimHostFloats) {
  std::vector<float> values(24);
  std::vector<int32_t> ints(24);
  auto with = [](int p, Tensor t) {
    return [p, t] {
      Parts parts;
      parts[p] = {t, nullptr};
      LoraEmbeddings e(parts);
    };
  };
  expect_error<LoraError>(with(P::kEmbedTokens, Tensor(values.data(), DType::kFloat32, {24})),
                          "embed_tokens must be a contiguous 2-D float32, float16 or bfloat16 "
                          "array, got [24] float32 cpu");
  expect_error<LoraError>(with(P::kLmHead, Tensor(ints.data(), DType::kInt32, {4, 6})),
                          "lm_head must be a contiguous 2-D float32, float16 or bfloat16 array, "
                          "got [4, 6] int32 cpu");
  const int64_t shape[2] = {4, 3};
  const int64_t strides[2] = {6, 1};  // every other 3 columns of a [4, 6] array
  expect_error<LoraError>(
      with(P::kEmbedLoraA, Tensor(values.data(), DType::kFloat32, 2, shape, strides)),
      "embed_lora_a must be a contiguous 2-D float32");
  expect_error<LoraError>(
      with(P::kLmHeadLoraB, Tensor(values.data(), DType::kFloat32, {4, 6}, Device::cuda())),
      "lm_head_lora_b must be in host memory, got a tensor on cuda:0");
  EXPECT_STREQ(P::part_name(P::kEmbedLoraB), "embed_lora_b");
  EXPECT_STREQ(P::part_name(P::kLmHeadLoraA), "lm_head_lora_a");
  EXPECT_STREQ(P::part_name(P::kNumParts), "unknown");
  EXPECT_STREQ(P::part_name(-1), "unknown");
}

TEST(LoraEmbeddingsTest, VocabSizeIsTheRowsOfEitherTable) {
  EXPECT_TRUE(LoraEmbeddings(Parts{}).empty());
  EXPECT_EQ(LoraEmbeddings(Parts{}).vocab_size(), 0);
  Parts embed_only;
  embed_only[P::kEmbedTokens] = part(70, 8, 1);
  EXPECT_EQ(LoraEmbeddings(embed_only).vocab_size(), 70);
  EXPECT_FALSE(LoraEmbeddings(embed_only).empty());
  Parts head_only;
  head_only[P::kLmHead] = part(90, 8, 2);
  EXPECT_EQ(LoraEmbeddings(head_only).vocab_size(), 90);
  // LoRA pairs alone keep the model's vocabulary (even though A spans V columns).
  Parts lora_only;
  lora_only[P::kEmbedLoraA] = part(2, 70, 3);
  lora_only[P::kEmbedLoraB] = part(8, 2, 4);
  lora_only[P::kLmHeadLoraA] = part(2, 8, 5);
  lora_only[P::kLmHeadLoraB] = part(70, 2, 6);
  const LoraEmbeddings lora(lora_only);
  EXPECT_EQ(lora.vocab_size(), 0);
  EXPECT_FALSE(lora.has(P::kEmbedTokens));
  EXPECT_TRUE(lora.has(P::kLmHeadLoraB));
  EXPECT_EQ(lora.nbytes(), (2 * 70 + 8 * 2 + 2 * 8 + 70 * 2) * sizeof(float));
}

TEST(LoraEmbeddingsTest, TiedTablesAreOneMemoryAndCountedOnce) {
  Parts tied;
  tied[P::kEmbedTokens] = part(70, 8, 1);
  tied[P::kLmHead] = tied[P::kEmbedTokens];
  const LoraEmbeddings e(tied);
  EXPECT_TRUE(e.lm_head_is_embed_tokens());
  EXPECT_EQ(e.nbytes(), 70u * 8 * sizeof(float));

  // Equal values in other memory are two tables.
  Parts untied;
  untied[P::kEmbedTokens] = part(70, 8, 1);
  untied[P::kLmHead] = part(70, 8, 1);
  const LoraEmbeddings u(untied);
  EXPECT_FALSE(u.lm_head_is_embed_tokens());
  EXPECT_EQ(u.nbytes(), 2u * 70 * 8 * sizeof(float));

  // The same address with another shape or dtype is not the same table.
  Parts fewer_rows = tied;
  fewer_rows[P::kLmHead].tensor =
      Tensor(tied[P::kEmbedTokens].tensor.data(), DType::kFloat32, {69, 8});
  EXPECT_FALSE(LoraEmbeddings(fewer_rows).lm_head_is_embed_tokens());
  Parts other_dtype = tied;
  other_dtype[P::kLmHead].tensor =
      Tensor(tied[P::kEmbedTokens].tensor.data(), DType::kBFloat16, {70, 8});
  EXPECT_FALSE(LoraEmbeddings(other_dtype).lm_head_is_embed_tokens());
  EXPECT_EQ(LoraEmbeddings(other_dtype).nbytes(), 70u * 8 * (4 + 2));
  // Only one of the tables: nothing to tie.
  Parts one;
  one[P::kLmHead] = tied[P::kEmbedTokens];
  EXPECT_FALSE(LoraEmbeddings(one).lm_head_is_embed_tokens());
}

TEST(LoraEmbeddingsTest, CopyOwnsItsPartsAndKeepsATiedPairTied) {
  Parts parts;
  parts[P::kEmbedTokens] = part(70, 8, 1);
  parts[P::kLmHead] = parts[P::kEmbedTokens];
  parts[P::kLmHeadLoraA] = part(2, 8, 2);
  parts[P::kLmHeadLoraB] = part(70, 2, 3);
  const LoraEmbeddings e(parts);
  const LoraEmbeddings copy = e.copy();
  EXPECT_TRUE(copy.lm_head_is_embed_tokens());
  EXPECT_EQ(copy.part(P::kLmHead).data(), copy.part(P::kEmbedTokens).data());
  EXPECT_EQ(copy.nbytes(), e.nbytes());
  EXPECT_TRUE(copy.same_as(e));
  EXPECT_TRUE(e.same_as(copy));
  for (int p : {P::kEmbedTokens, P::kLmHeadLoraA, P::kLmHeadLoraB}) {
    EXPECT_NE(copy.part(p).data(), e.part(p).data()) << P::part_name(p);
    EXPECT_EQ(copy.part(p).dtype(), DType::kFloat32);
  }
  EXPECT_FALSE(copy.has(P::kEmbedLoraA));
  // The copy does not follow later writes to the source.
  static_cast<float*>(parts[P::kEmbedTokens].tensor.data())[17] += 1.0f;
  EXPECT_FALSE(copy.same_as(e));
  EXPECT_NE(at(copy.part(P::kEmbedTokens), 17), at(e.part(P::kEmbedTokens), 17));
}

TEST(LoraEmbeddingsTest, ToConvertsEveryPartAndKeepsTheTie) {
  Parts parts;
  parts[P::kEmbedTokens] = part(70, 8, 1);
  parts[P::kLmHead] = parts[P::kEmbedTokens];
  parts[P::kEmbedLoraA] = part(2, 70, 2);
  parts[P::kEmbedLoraB] = part(8, 2, 3);
  const LoraEmbeddings e(parts);
  const LoraEmbeddings bf16 = e.to(DType::kBFloat16);
  EXPECT_TRUE(bf16.lm_head_is_embed_tokens());
  EXPECT_EQ(bf16.nbytes() * 2, e.nbytes());
  for (int p : {P::kEmbedTokens, P::kLmHead, P::kEmbedLoraA, P::kEmbedLoraB}) {
    const Tensor& t = bf16.part(p);
    ASSERT_EQ(t.dtype(), DType::kBFloat16) << P::part_name(p);
    EXPECT_EQ(t.size(0), e.part(p).size(0));
    EXPECT_EQ(t.size(1), e.part(p).size(1));
    for (int64_t i = 0; i < t.numel(); ++i) {
      ASSERT_EQ(at(t, i), bfloat16_to_float(float_to_bfloat16(at(e.part(p), i))))
          << P::part_name(p) << " " << i;
    }
  }
  EXPECT_FALSE(bf16.same_as(e));  // another dtype
  const LoraEmbeddings back = bf16.to(DType::kFloat32);
  EXPECT_FALSE(back.same_as(e));  // rounded
  EXPECT_TRUE(back.same_as(bf16.to(DType::kFloat32)));
  expect_error<LoraError>([&] { e.to(DType::kInt32); },
                          "LoRA embedding-side parts can only be converted to float32, float16 or "
                          "bfloat16, not int32");
}

TEST(LoraEmbeddingsTest, SameAsComparesPartsShapesDtypesBytesAndTheTie) {
  Parts parts;
  parts[P::kEmbedTokens] = part(70, 8, 1);
  parts[P::kLmHead] = part(70, 8, 2);
  const LoraEmbeddings e(parts);
  Parts equal;
  equal[P::kEmbedTokens] = part(70, 8, 1);
  equal[P::kLmHead] = part(70, 8, 2);
  EXPECT_TRUE(e.same_as(LoraEmbeddings(equal)));

  Parts missing = equal;
  missing[P::kLmHead] = {};
  EXPECT_FALSE(e.same_as(LoraEmbeddings(missing)));
  EXPECT_FALSE(LoraEmbeddings(missing).same_as(e));
  Parts other_value = equal;
  other_value[P::kLmHead] = part(70, 8, 2);
  static_cast<float*>(other_value[P::kLmHead].tensor.data())[559] *= -1.0f;  // the last value
  EXPECT_FALSE(e.same_as(LoraEmbeddings(other_value)));
  Parts other_shape = equal;  // the same bytes read as [56, 10]
  other_shape[P::kLmHead].tensor =
      Tensor(equal[P::kLmHead].tensor.data(), DType::kFloat32, {56, 10});
  EXPECT_FALSE(e.same_as(LoraEmbeddings(other_shape)));
  Parts other_part = equal;  // the same table as another part
  other_part[P::kLmHeadLoraB] = other_part[P::kLmHead];
  other_part[P::kLmHead] = {};
  EXPECT_FALSE(e.same_as(LoraEmbeddings(other_part)));

  // Tied and untied tables of equal values differ: the tie decides what lm_head is.
  Parts tied;
  tied[P::kEmbedTokens] = part(70, 8, 1);
  tied[P::kLmHead] = tied[P::kEmbedTokens];
  Parts untied;
  untied[P::kEmbedTokens] = part(70, 8, 1);
  untied[P::kLmHead] = part(70, 8, 1);
  EXPECT_FALSE(LoraEmbeddings(tied).same_as(LoraEmbeddings(untied)));
  EXPECT_TRUE(LoraEmbeddings(tied).same_as(LoraEmbeddings(tied).copy()));
}

// LoraWeights carries the parts: bytes, copies, conversion and comparison include them.
TEST(LoraEmbeddingsTest, LoraWeightsCarryTheParts) {
  Parts parts;
  parts[P::kEmbedTokens] = part(70, 8, 1);
  parts[P::kLmHead] = part(70, 8, 2);
  auto e = std::make_shared<const LoraEmbeddings>(parts);
  std::vector<float> rows = testing_util::random_floats(2 * 16, 3);
  const LoraWeights w(Tensor(rows.data(), DType::kFloat32, {2, 16}), nullptr, e);
  EXPECT_EQ(w.embeddings(), e.get());
  EXPECT_EQ(w.nbytes(), 2u * 16 * 4 + 2u * 70 * 8 * 4);

  const LoraWeights copy = w.copy();
  ASSERT_NE(copy.embeddings(), nullptr);
  EXPECT_NE(copy.embeddings(), e.get());
  EXPECT_NE(copy.embeddings()->part(P::kLmHead).data(), e->part(P::kLmHead).data());
  EXPECT_NE(copy.tensor().data(), rows.data());
  EXPECT_TRUE(copy.same_as(w));
  EXPECT_EQ(copy.nbytes(), w.nbytes());
  // copy_of takes the rows alone.
  const LoraWeights rows_only = LoraWeights::copy_of(w.tensor());
  EXPECT_EQ(rows_only.embeddings(), nullptr);
  EXPECT_FALSE(rows_only.same_as(w));
  EXPECT_FALSE(w.same_as(rows_only));

  const LoraWeights half = w.to(DType::kFloat16);
  ASSERT_NE(half.embeddings(), nullptr);
  EXPECT_EQ(half.embeddings()->part(P::kEmbedTokens).dtype(), DType::kFloat16);
  EXPECT_EQ(half.embeddings()->part(P::kLmHead).dtype(), DType::kFloat16);
  EXPECT_EQ(half.nbytes() * 2, w.nbytes());

  // Same rows, other parts.
  Parts other = parts;
  other[P::kLmHead] = part(70, 8, 4);
  const LoraWeights w2(Tensor(rows.data(), DType::kFloat32, {2, 16}), nullptr,
                       std::make_shared<const LoraEmbeddings>(other));
  EXPECT_FALSE(w2.same_as(w));
  // An empty LoraEmbeddings is no parts at all.
  const LoraWeights none(Tensor(rows.data(), DType::kFloat32, {2, 16}), nullptr,
                         std::make_shared<const LoraEmbeddings>(Parts{}));
  EXPECT_EQ(none.embeddings(), nullptr);
  EXPECT_TRUE(none.same_as(rows_only));
}

// An adapter that only replaces tables has zero rows.
TEST(LoraEmbeddingsTest, WeightsMayHaveZeroRowsBesideTheParts) {
  Parts parts;
  parts[P::kEmbedTokens] = part(70, 8, 1);
  const LoraWeights w(Tensor(nullptr, DType::kFloat32, {0, 0}), nullptr,
                      std::make_shared<const LoraEmbeddings>(parts));
  EXPECT_EQ(w.num_rows(), 0);
  EXPECT_EQ(w.nbytes(), 70u * 8 * 4);
  const LoraWeights copy = w.copy();
  EXPECT_EQ(copy.num_rows(), 0);
  EXPECT_TRUE(copy.same_as(w));
}

}  // namespace
}  // namespace lorart
