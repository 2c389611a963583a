// Dense GEMM and the grouped LoRA GEMM (shrink x @ A^T, expand @ B^T per adapter segment), both on
// the fixed-order kernels at every row count, so a token's result never depends on its batch, on
// its segment's length or on the thread count (fixed_order_gemm.h). What varies with the batch
// is only how the work is split: columns across threads, and for LoRA, whether a segment's
// adapter is widened to float32 once (long segments) or as it is read (short ones).
#include <omp.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/cpu/column_share.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fixed_order_gemm.h"
#include "kernels/cpu/float_mode.h"

namespace lorart::cpu {

void linear(const LinearParams& p) {
  if (p.precision == Precision::kBFloat16) {
    linear_bf16(p.x, p.x_stride, p.w.data, p.w.dtype, p.m, p.n, p.k, p.beta, p.y, p.y_stride,
                p.w.layout);
    return;
  }
  const int threads = p.m * p.n * p.k < (int64_t{1} << 18) ? 1 : omp_get_max_threads();
  const FloatMode mode;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const FloatMode::Scope same(mode);
    const auto [begin, end] = column_share(p.n, omp_get_num_threads(), omp_get_thread_num());
    gemm_nt(p.w.dtype, p.m, begin, end, p.k, p.x, p.x_stride, p.w.data, p.w.stride, p.beta, p.y,
            p.y_stride, p.w.layout);
  }
}

namespace {

// Segments up to this many tokens (decode) run in two phases, a shrink item per segment, then
// expand items over output columns, so that a batch of one-token segments spreads over the
// threads; their adapters are widened in registers. Longer segments (prefill) are items over
// token blocks that shrink and expand their own rows, with the adapter widened to float32 once per
// thread (float16 widening in registers costs ~2x a float32 load at prefill's reuse).
constexpr int64_t kShortSegment = 16;

struct Segment {
  int32_t begin, end;
  LoraPair pair;
};

// One unit of lora_gemm's parallel work: `seg`'s rows [begin, end), which are rank rows (short
// shrink), output columns (short expand) or tokens (a long segment, shrink and expand both).
struct LoraItem {
  int32_t seg;
  int64_t begin;
  int64_t end;
};

// Output columns per short expand item: about two items per thread over all short segments, in
// [256, 4096]. Long rows of B^T per item keep its reads streaming (8 one-token segments of a
// 1.1B model at 4096 columns: LoRA on / off 0.87 -> 0.89), while a lone segment (batch 1) still
// spreads over the threads. Where the split falls never changes a column's arithmetic.
int64_t expand_item_columns(int64_t num_short, int64_t out, int threads) {
  const int64_t target = std::max<int64_t>(1, 2 * int64_t{threads});
  const int64_t columns = (num_short * out + target - 1) / target;
  return std::clamp<int64_t>((columns + 255) / 256 * 256, 256, 4096);
}
// Tokens per item of a long (prefill) segment.
constexpr int64_t kLongTokens = 64;

// A and B^T of `pair` as float32: the stored rows when they are float32, else widened (exactly)
// into `storage` (per thread). `widened_from` remembers whose rows `storage` holds, so a thread
// that takes several token blocks of one segment widens its adapter once.
std::pair<const float*, const float*> float32_pair(const LoraPair& pair, int64_t in, int64_t out,
                                                   std::vector<float>& storage,
                                                   const void*& widened_from) {
  if (pair.dtype == DType::kFloat32) {
    return {static_cast<const float*>(pair.a), static_cast<const float*>(pair.b_t)};
  }
  const size_t a_size = static_cast<size_t>(pair.rank) * in, b_size = size_t(pair.rank) * out;
  if (widened_from != pair.a) {
    storage.resize(a_size + b_size);
    convert_floats(pair.a, pair.dtype, storage.data(), DType::kFloat32, a_size);
    convert_floats(pair.b_t, pair.dtype, storage.data() + a_size, DType::kFloat32, b_size);
    widened_from = pair.a;
  }
  return {storage.data(), storage.data() + a_size};
}

}  // namespace

void lora_gemm(const LoraGemmParams& p) {
  // Plan on the calling thread: scratch offsets (each segment owns (end - begin) * rank floats)
  // and the work items. Short segments run in two phases separated by a barrier: shrink, one item
  // per segment, then expand, items over output columns. Long segments are items over token
  // blocks that shrink and expand their own rows in the first phase.
  // A segment is a run whose slot's adapter adapts this module, with that pair looked up once.
  thread_local std::vector<Segment> segment_storage;
  segment_storage.clear();
  for (int32_t i = 0; i < p.num_runs; ++i) {
    const LoraRun& run = p.runs[i];
    const LoraPair& pair = p.pairs[run.slot * p.slot_stride];
    if (pair.rank > 0 && run.end > run.begin) segment_storage.push_back({run.begin, run.end, pair});
  }
  const Segment* segments = segment_storage.data();
  const auto num_segments = static_cast<int32_t>(segment_storage.size());
  thread_local std::vector<int64_t> offsets;
  thread_local std::vector<LoraItem> shrink_items, expand_items;
  offsets.assign(num_segments, 0);
  shrink_items.clear();
  expand_items.clear();
  int64_t used = 0, weight_elements = 0;
  int32_t num_short = 0;
  for (int32_t i = 0; i < num_segments; ++i) {
    num_short += segments[i].end - segments[i].begin <= kShortSegment;
  }
  const int64_t expand_columns = expand_item_columns(num_short, p.out, omp_get_max_threads());
  for (int32_t i = 0; i < num_segments; ++i) {
    const Segment& seg = segments[i];
    const int64_t n = seg.end - seg.begin, r = seg.pair.rank;
    offsets[i] = used;
    used += n * r;
    if (r == 0 || n == 0) continue;
    weight_elements += r * (p.in + p.out);
    if (n <= kShortSegment) {
      shrink_items.push_back({i, 0, r});
      for (int64_t c = 0; c < p.out; c += expand_columns) {
        expand_items.push_back({i, c, std::min(p.out, c + expand_columns)});
      }
    } else {
      for (int64_t t = 0; t < n; t += kLongTokens) {
        shrink_items.push_back({i, t, std::min(n, t + kLongTokens)});
      }
    }
  }
  if (shrink_items.empty()) return;
  // Threads pay off once the items read a few hundred KB of adapter weights or do real GEMMs.
  const bool parallel =
      shrink_items.size() + expand_items.size() > 1 &&
      (weight_elements >= (int64_t{1} << 15) || used * (p.in + p.out) >= (1 << 18));
  const LoraItem* shrink = shrink_items.data();
  const LoraItem* expand = expand_items.data();
  const auto num_shrink = static_cast<int64_t>(shrink_items.size());
  const auto num_expand = static_cast<int64_t>(expand_items.size());
  const int64_t* seg_offsets = offsets.data();
  const FloatMode mode;
#pragma omp parallel if (parallel)
  {
    const FloatMode::Scope same(mode);
    thread_local std::vector<float> widened;
    const void* widened_from = nullptr;  // per call: adapters may be freed between calls
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < num_shrink; ++i) {
      const LoraItem& item = shrink[i];
      const Segment& seg = segments[item.seg];
      const int64_t n = seg.end - seg.begin, r = seg.pair.rank;
      const float* x = p.x + seg.begin * p.x_stride;
      float* tmp = p.scratch + seg_offsets[item.seg];
      if (n <= kShortSegment) {
        gemm_nt(seg.pair.dtype, n, item.begin, item.end, p.in, x, p.x_stride, seg.pair.a, p.in,
                0.0f, tmp, r);
        continue;
      }
      const auto [a, b_t] = float32_pair(seg.pair, p.in, p.out, widened, widened_from);
      const int64_t rows = item.end - item.begin;
      float* tmp_rows = tmp + item.begin * r;
      gemm_nt(DType::kFloat32, rows, 0, r, p.in, x + item.begin * p.x_stride, p.x_stride, a, p.in,
              0.0f, tmp_rows, r);
      gemm_nn(DType::kFloat32, rows, 0, p.out, r, tmp_rows, r, b_t, p.out,
              p.y + (seg.begin + item.begin) * p.y_stride, p.y_stride);
    }
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < num_expand; ++i) {
      const LoraItem& item = expand[i];
      const Segment& seg = segments[item.seg];
      const int64_t r = seg.pair.rank;
      gemm_nn(seg.pair.dtype, seg.end - seg.begin, item.begin, item.end, r,
              p.scratch + seg_offsets[item.seg], r, seg.pair.b_t, p.out,
              p.y + seg.begin * p.y_stride, p.y_stride);
    }
  }
}

void set_num_threads(int threads) { omp_set_num_threads(threads); }

int num_threads() { return omp_get_max_threads(); }

}  // namespace lorart::cpu
