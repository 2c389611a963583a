// ops::lora_gemm_slices on the GPU (lora_gemm.h): the grouped shrink (x @ A^T, split over fixed
// K chunks) and expand (+= s @ B^T), over tiles of tokens that may mix adapters.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda/cuda_check.h"
#include "core/errors.h"
#include "kernels/cuda/lora/lora_gemm.h"

namespace lorart::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLaneColumns = 8;               // shrink: contiguous K columns per lane
constexpr int kRankBlock = 64;                // expand: ranks staged in shared memory per pass
constexpr int kExpandColumns = 2 * kThreads;  // expand: y columns per block (two per thread)
static_assert(kLoraChunk == 32 * kLaneColumns, "a shrink chunk is one warp's columns");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// v[i] = row[i] for i < valid, 0 beyond; one or two 16-byte loads when `vector` (the caller
// checked alignment and that all 8 are valid). The values, hence the sums, are the same either way.
template <class T>
__device__ __forceinline__ void load8(const T* row, int valid, bool vector, float (&v)[8]) {
  if (vector) {
    if constexpr (sizeof(T) == 4) {
      const float4 lo = reinterpret_cast<const float4*>(row)[0];
      const float4 hi = reinterpret_cast<const float4*>(row)[1];
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
      v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
      const uint4 bits = *reinterpret_cast<const uint4*>(row);
      const T* h = reinterpret_cast<const T*>(&bits);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = i < valid ? to_float(row[i]) : 0.0f;
}

// The same fixed butterfly in every call: lane 0's total is the one written.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// First run whose end is past `token` (runs are in token order and do not overlap).
__device__ int first_run_after(const LoraRun* runs, int num_runs, int token) {
  int lo = 0, hi = num_runs;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (runs[mid].end <= token) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ __forceinline__ int64_t scratch_index(const CudaLoraParams& p, int slice, int chunks,
                                                 int chunk, int token, int rank) {
  return ((static_cast<int64_t>(slice) * chunks + chunk) * p.scratch_tokens + token) *
             p.rank_stride +
         rank;
}

// Shrink of one run's tokens [b, e) (inside the tile) for one chunk: each warp takes rank rows
// j = warp, warp + kWarps, ... of A.
template <int kTile, class T>
__device__ void shrink_run(const CudaLoraParams& p, const LoraPair& pair, int tile_begin, int b,
                           int e, const float (&xs)[kTile][kLoraChunk], int chunks, int chunk,
                           int slice) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = static_cast<int64_t>(chunk) * kLoraChunk;
  const int column = lane * kLaneColumns;
  const int64_t left = p.in - k0 - column;  // K columns from this lane's first on
  const int valid = left <= 0 ? 0 : left >= kLaneColumns ? kLaneColumns : static_cast<int>(left);
  const T* a = static_cast<const T*>(pair.a);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && p.in % (16 / sizeof(T)) == 0;
  const bool vector = aligned && valid == kLaneColumns;
  for (int j = warp; j < pair.rank; j += kWarps) {
    float w[8] = {};
    if (valid > 0) load8(a + j * p.in + k0 + column, valid, vector, w);
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const int token = tile_begin + t;
      if (token < b || token >= e) continue;  // warp-uniform
      const float4 lo = *reinterpret_cast<const float4*>(&xs[t][column]);
      const float4 hi = *reinterpret_cast<const float4*>(&xs[t][column + 4]);
      float acc = w[0] * lo.x;
      acc = fmaf(w[1], lo.y, acc);
      acc = fmaf(w[2], lo.z, acc);
      acc = fmaf(w[3], lo.w, acc);
      acc = fmaf(w[4], hi.x, acc);
      acc = fmaf(w[5], hi.y, acc);
      acc = fmaf(w[6], hi.z, acc);
      acc = fmaf(w[7], hi.w, acc);
      acc = warp_sum(acc);
      if (lane == 0) p.scratch[scratch_index(p, slice, chunks, chunk, token, j)] = acc;
    }
  }
}

template <int kTile>
__global__ void __launch_bounds__(kThreads) lora_shrink(CudaLoraParams p, int chunks) {
  __shared__ __align__(16) float xs[kTile][kLoraChunk];
  __shared__ int first;
  const int tile_begin = blockIdx.x * kTile;
  const int tile_end = min(p.num_tokens, tile_begin + kTile);
  const int chunk = blockIdx.y, slice = blockIdx.z;
  if (threadIdx.x == 0) first = first_run_after(p.runs, p.num_runs, tile_begin);
  __syncthreads();
  if (first >= p.num_runs || p.runs[first].begin >= tile_end) return;  // no adapted token here
  const int64_t k0 = static_cast<int64_t>(chunk) * kLoraChunk;
  for (int i = threadIdx.x; i < kTile * kLoraChunk; i += kThreads) {
    const int t = i / kLoraChunk, k = i % kLoraChunk;
    const int token = tile_begin + t;
    xs[t][k] = token < tile_end && k0 + k < p.in ? p.x[token * p.x_stride + k0 + k] : 0.0f;
  }
  __syncthreads();
  const LoraSlice& s = p.slices[slice];
  for (int r = first; r < p.num_runs; ++r) {
    const LoraRun run = p.runs[r];
    if (run.begin >= tile_end) break;
    const int b = max(run.begin, tile_begin), e = min(run.end, tile_end);
    if (b >= e) continue;
    const LoraPair pair = p.pairs[run.slot * p.slot_stride + s.pair_index];
    if (pair.rank == 0) continue;
    switch (pair.dtype) {
      case DType::kFloat16:
        shrink_run<kTile, __half>(p, pair, tile_begin, b, e, xs, chunks, chunk, slice);
        break;
      case DType::kBFloat16:
        shrink_run<kTile, __nv_bfloat16>(p, pair, tile_begin, b, e, xs, chunks, chunk, slice);
        break;
      default:
        shrink_run<kTile, float>(p, pair, tile_begin, b, e, xs, chunks, chunk, slice);
        break;
    }
  }
}

// acc[t][c] += s[t][j] * B^T[rank_begin + j, o + c] over the staged ranks, j ascending, for the
// thread's slice columns o and o + 1 (each only where `take[c]`) and the run's tile rows.
template <int kTile, class T>
__device__ void expand_ranks(const LoraPair& pair, int64_t out, int64_t o, const bool (&take)[2],
                             int rank_begin, int num_ranks, const float (&s)[kTile][kRankBlock],
                             int t_begin, int t_end, float (&acc)[kTile][2]) {
  const T* bt = static_cast<const T*>(pair.b_t);
  const bool vector = take[0] && take[1] && out % 2 == 0 && o % 2 == 0 &&
                      reinterpret_cast<uintptr_t>(bt) % (2 * sizeof(T)) == 0;
  for (int j = 0; j < num_ranks; ++j) {
    const T* row = bt + (rank_begin + j) * out + o;
    float w0 = 0.0f, w1 = 0.0f;
    if (vector) {
      if constexpr (sizeof(T) == 4) {
        const float2 v = *reinterpret_cast<const float2*>(row);
        w0 = v.x, w1 = v.y;
      } else {
        const uint32_t bits = *reinterpret_cast<const uint32_t*>(row);
        const T* h = reinterpret_cast<const T*>(&bits);
        w0 = to_float(h[0]), w1 = to_float(h[1]);
      }
    } else {
      if (take[0]) w0 = to_float(row[0]);
      if (take[1]) w1 = to_float(row[1]);
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (t < t_begin || t >= t_end) continue;
      acc[t][0] = fmaf(s[t][j], w0, acc[t][0]);
      acc[t][1] = fmaf(s[t][j], w1, acc[t][1]);
    }
  }
}

template <int kTile>
__global__ void __launch_bounds__(kThreads)
    lora_expand(CudaLoraParams p, int chunks, int64_t column_begin) {
  __shared__ float s[kTile][kRankBlock];
  __shared__ int first;
  const int tile_begin = blockIdx.x * kTile;
  const int tile_end = min(p.num_tokens, tile_begin + kTile);
  if (threadIdx.x == 0) first = first_run_after(p.runs, p.num_runs, tile_begin);
  __syncthreads();
  if (first >= p.num_runs || p.runs[first].begin >= tile_end) return;
  const int64_t block_column = column_begin + static_cast<int64_t>(blockIdx.y) * kExpandColumns;
  const int64_t column = block_column + 2 * threadIdx.x;  // the thread's columns of y
  for (int i = 0; i < p.num_slices; ++i) {
    const LoraSlice sl = p.slices[i];
    if (block_column >= sl.out_offset + sl.out || block_column + kExpandColumns <= sl.out_offset) {
      continue;  // block-uniform
    }
    // The thread owns y's columns `column` and `column + 1` for every slice (no two blocks or
    // threads add to one element); o is the first one's index within this slice.
    const int64_t o = column - sl.out_offset;
    const bool take[2] = {o >= 0 && o < sl.out, o + 1 >= 0 && o + 1 < sl.out};
    const bool mine = take[0] || take[1];
    for (int r = first; r < p.num_runs; ++r) {
      const LoraRun run = p.runs[r];
      if (run.begin >= tile_end) break;
      const int b = max(run.begin, tile_begin), e = min(run.end, tile_end);
      if (b >= e) continue;
      const LoraPair pair = p.pairs[run.slot * p.slot_stride + sl.pair_index];
      if (pair.rank == 0) continue;
      const int t_begin = b - tile_begin, t_end = e - tile_begin;
      float acc[kTile][2] = {};
      for (int rank_begin = 0; rank_begin < pair.rank; rank_begin += kRankBlock) {
        const int num_ranks = min(kRankBlock, pair.rank - rank_begin);
        __syncthreads();  // the previous pass's readers are done with s
        for (int k = threadIdx.x; k < (t_end - t_begin) * num_ranks; k += kThreads) {
          const int t = t_begin + k / num_ranks, j = k % num_ranks;
          float sum = 0.0f;
          for (int c = 0; c < chunks; ++c) {
            sum += p.scratch[scratch_index(p, i, chunks, c, tile_begin + t, rank_begin + j)];
          }
          s[t][j] = sum;
        }
        __syncthreads();
        if (!mine) continue;
        switch (pair.dtype) {
          case DType::kFloat16:
            expand_ranks<kTile, __half>(pair, sl.out, o, take, rank_begin, num_ranks, s, t_begin,
                                        t_end, acc);
            break;
          case DType::kBFloat16:
            expand_ranks<kTile, __nv_bfloat16>(pair, sl.out, o, take, rank_begin, num_ranks, s,
                                               t_begin, t_end, acc);
            break;
          default:
            expand_ranks<kTile, float>(pair, sl.out, o, take, rank_begin, num_ranks, s, t_begin,
                                       t_end, acc);
            break;
        }
      }
      if (!mine) continue;
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        if (t < t_begin || t >= t_end) continue;
        float* y = p.y + static_cast<int64_t>(tile_begin + t) * p.y_stride + column;
        if (take[0]) y[0] += acc[t][0];
        if (take[1]) y[1] += acc[t][1];
      }
    }
  }
}

template <int kTile>
void launch(const CudaLoraParams& p, cudaStream_t stream) {
  const int64_t chunks = (p.in + kLoraChunk - 1) / kLoraChunk;
  int64_t column_begin = p.slices[0].out_offset, column_end = 0;
  for (int i = 0; i < p.num_slices; ++i) {
    column_begin = std::min(column_begin, p.slices[i].out_offset);
    column_end = std::max(column_end, p.slices[i].out_offset + p.slices[i].out);
  }
  const int64_t tiles = (p.num_tokens + kTile - 1) / kTile;
  const int64_t column_tiles = (column_end - column_begin + kExpandColumns - 1) / kExpandColumns;
  if (chunks == 0 || column_tiles == 0) return;  // no input or no output columns: nothing to add
  if (chunks > 65535 || column_tiles > 65535 || tiles > 0x7fffffff) {
    raise<InvalidArgument>("lora_gemm: ", p.in, " input columns, ", column_end - column_begin,
                           " output columns or ", p.num_tokens,
                           " tokens exceed the CUDA grid's limits");
  }
  const dim3 shrink_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks),
                         static_cast<unsigned>(p.num_slices));
  lora_shrink<kTile><<<shrink_grid, kThreads, 0, stream>>>(p, static_cast<int>(chunks));
  check_launch("lora_shrink");
  const dim3 expand_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(column_tiles));
  lora_expand<kTile>
      <<<expand_grid, kThreads, 0, stream>>>(p, static_cast<int>(chunks), column_begin);
  check_launch("lora_expand");
}

}  // namespace

void lora_gemm(const CudaLoraParams& p, void* stream) {
  if (p.num_tokens == 0 || p.num_runs == 0 || p.num_slices == 0) return;
  // Small steps (decode) take 4-token tiles so more blocks share the work; the tile never
  // changes a token's arithmetic.
  if (p.num_tokens <= 128) {
    launch<4>(p, static_cast<cudaStream_t>(stream));
  } else {
    launch<16>(p, static_cast<cudaStream_t>(stream));
  }
}

}  // namespace lorart::cuda
