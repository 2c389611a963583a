// LoraDeviceTable: the per-step LoRA slot table in the model's device memory. Each step, upload()
// packs the step's runs (LoraRun[num_runs]) and the LoraTable's pairs
// (LoraPair[num_slots * pairs_per_slot], whose a / b_t / dora_scale already point into the LoRA
// cache's device pages) into one staging buffer and copies them to the device in one copy, then
// sets the batch's device_runs / device_pairs, which the CUDA LoRA kernels read. On the CPU
// backend the same code packs into a host block (the kernels read the host arrays; the copy keeps
// one code path and is tested here).
// The copy is queued on the caller's compute stream (in order with the step's kernels, so it
// needs no cross-stream wait); the staging buffer is rewritten only after the previous upload's
// copy completed (an event). Both buffers grow to the largest step and are then reused: steady
// state steps do not allocate. Owned by the model (one per LlamaModel); not thread-safe.
#pragma once

#include <cstddef>
#include <memory>

#include "core/buffer.h"
#include "core/copy_stream.h"
#include "core/device.h"
#include "kernels/ops.h"

namespace lorart {

class LoraDeviceTable {
 public:
  // `compute_stream`: the cudaStream_t the model runs on (it must outlive this table; null for
  // the CPU or the legacy default stream).
  explicit LoraDeviceTable(Device device, void* compute_stream = nullptr);

  // Uploads `batch`'s runs and pairs (host arrays) in one copy and points batch->device_runs /
  // device_pairs at the device copies, valid until the next upload(). A batch without runs gets
  // null device arrays.
  void upload(ops::LoraBatch* batch);

  // Byte offset of the pairs in the packed block: after the runs, rounded up to kAlignment.
  static size_t pairs_offset(int32_t num_runs);
  static size_t packed_bytes(int32_t num_runs, int64_t num_pairs);
  static constexpr size_t kAlignment = 64;

  size_t capacity() const { return device_.size(); }
  int64_t uploads() const { return uploads_; }  // copies issued (one per upload with runs)

 private:
  void reserve(size_t bytes);

  Device device_type_;
  CopyStream copies_;
  StagingBuffer staging_;
  Buffer device_;
  int64_t uploads_ = 0;
};

}  // namespace lorart
