#include "lora/module_ids.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

namespace lorart {
namespace {

// TensorRT-LLM's LoraModule::ModuleType order; adapters exported from it use these ids.
const std::vector<std::string> kTrtLlmNames = {
    "attn_qkv",     "attn_q",       "attn_k",           "attn_v",         "attn_dense",
    "mlp_h_to_4h",  "mlp_4h_to_h",  "mlp_gate",         "cross_attn_qkv", "cross_attn_q",
    "cross_attn_k", "cross_attn_v", "cross_attn_dense", "moe_h_to_4h",    "moe_4h_to_h",
    "moe_gate",     "moe_router",   "mlp_router",
};

TEST(LoraModuleTableTest, HasEighteenEntriesInIdOrderWithTrtLlmNames) {
  const auto& table = lora_module_table();
  ASSERT_EQ(table.size(), 18u);
  ASSERT_EQ(lora_module::kCount, 18);
  for (int32_t i = 0; i < lora_module::kCount; ++i) {
    EXPECT_EQ(table[i].id, i);
    EXPECT_EQ(std::string(table[i].name), kTrtLlmNames[i]) << "id " << i;
    ASSERT_NE(table[i].hf_name, nullptr);
    ASSERT_NE(table[i].description, nullptr);
    EXPECT_STRNE(table[i].description, "") << "id " << i;
  }
}

TEST(LoraModuleTableTest, NamedConstantsMatchTheTable) {
  EXPECT_STREQ(lora_module_name(lora_module::kAttnQkv), "attn_qkv");
  EXPECT_STREQ(lora_module_name(lora_module::kAttnQ), "attn_q");
  EXPECT_STREQ(lora_module_name(lora_module::kAttnK), "attn_k");
  EXPECT_STREQ(lora_module_name(lora_module::kAttnV), "attn_v");
  EXPECT_STREQ(lora_module_name(lora_module::kAttnDense), "attn_dense");
  EXPECT_STREQ(lora_module_name(lora_module::kMlpHTo4H), "mlp_h_to_4h");
  EXPECT_STREQ(lora_module_name(lora_module::kMlp4HToH), "mlp_4h_to_h");
  EXPECT_STREQ(lora_module_name(lora_module::kMlpGate), "mlp_gate");
}

TEST(LoraModuleTableTest, HfNamesFollowTrtLlmMapping) {
  // TensorRT-LLM maps HF gate_proj to mlp_h_to_4h and up_proj to mlp_gate; swapping them
  // silently applies each adapter to the wrong branch of the gated MLP.
  const std::vector<std::string> expected = {"qkv_proj", "q_proj",    "k_proj",    "v_proj",
                                             "o_proj",   "gate_proj", "down_proj", "up_proj"};
  const auto& table = lora_module_table();
  for (int32_t i = 0; i < lora_module::kCount; ++i) {
    const std::string hf = table[i].hf_name;
    if (i < 8) {
      EXPECT_EQ(hf, expected[i]) << "id " << i;
    } else {
      EXPECT_EQ(hf, "") << "id " << i << " has no Llama-family projection";
    }
  }
  EXPECT_STREQ(find_lora_module(5)->hf_name, "gate_proj");
  EXPECT_STREQ(find_lora_module(7)->hf_name, "up_proj");
}

TEST(LoraModuleTableTest, TensorParallelSplits) {
  const std::set<int32_t> row = {4, 6, 12, 14};   // attn_dense, mlp_4h_to_h and their kin
  const std::set<int32_t> replicated = {16, 17};  // routers
  for (const LoraModuleInfo& info : lora_module_table()) {
    const TpSplit expected = row.count(info.id)          ? TpSplit::kRow
                             : replicated.count(info.id) ? TpSplit::kReplicated
                                                         : TpSplit::kColumn;
    EXPECT_EQ(info.tp_split, expected) << info.name;
  }
  EXPECT_EQ(find_lora_module("attn_dense")->tp_split, TpSplit::kRow);      // o_proj
  EXPECT_EQ(find_lora_module("mlp_4h_to_h")->tp_split, TpSplit::kRow);     // down_proj
  EXPECT_EQ(find_lora_module("mlp_h_to_4h")->tp_split, TpSplit::kColumn);  // gate_proj
  EXPECT_STREQ(tp_split_name(TpSplit::kColumn), "column");
  EXPECT_STREQ(tp_split_name(TpSplit::kRow), "row");
  EXPECT_STREQ(tp_split_name(TpSplit::kReplicated), "replicated");
  EXPECT_STREQ(tp_split_name(static_cast<TpSplit>(9)), "unknown");
}

TEST(LoraModuleLookupTest, ByIdAndByNameReturnTheTableEntry) {
  const auto& table = lora_module_table();
  for (const LoraModuleInfo& info : table) {
    EXPECT_EQ(find_lora_module(info.id), &info);
    EXPECT_EQ(find_lora_module(std::string_view(info.name)), &info);
    EXPECT_EQ(find_lora_module(std::string(info.name)), &info);  // not pointer identity
  }
  EXPECT_EQ(find_lora_module("moe_router")->id, 16);
  EXPECT_EQ(find_lora_module("cross_attn_q")->id, 9);
}

TEST(LoraModuleLookupTest, UnknownIdsAndNamesGiveNull) {
  EXPECT_EQ(find_lora_module(-1), nullptr);
  EXPECT_EQ(find_lora_module(18), nullptr);
  EXPECT_EQ(find_lora_module(42), nullptr);
  EXPECT_EQ(find_lora_module("q_proj"), nullptr);  // HF names are not module names
  EXPECT_EQ(find_lora_module("ATTN_Q"), nullptr);
  EXPECT_EQ(find_lora_module("attn_q "), nullptr);
  EXPECT_EQ(find_lora_module(""), nullptr);
  EXPECT_STREQ(lora_module_name(-1), "unknown");
  EXPECT_STREQ(lora_module_name(18), "unknown");
  EXPECT_STREQ(lora_module_name(17), "mlp_router");
}

}  // namespace
}  // namespace lorart
