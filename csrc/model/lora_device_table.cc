#include "model/lora_device_table.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/checked_math.h"
#include "core/errors.h"

namespace lorart {

LoraDeviceTable::LoraDeviceTable(Device device, void* compute_stream)
    : device_type_(device), copies_(device, CopyStream::Borrowed{compute_stream}) {}

size_t LoraDeviceTable::pairs_offset(int32_t num_runs) {
  const size_t runs = static_cast<size_t>(num_runs) * sizeof(LoraRun);
  return (runs + kAlignment - 1) / kAlignment * kAlignment;
}

size_t LoraDeviceTable::packed_bytes(int32_t num_runs, int64_t num_pairs) {
  const int64_t pairs =
      checked_mul(num_pairs, static_cast<int64_t>(sizeof(LoraPair)), "LoRA slot table bytes");
  return static_cast<size_t>(
      checked_add(static_cast<int64_t>(pairs_offset(num_runs)), pairs, "LoRA slot table bytes"));
}

void LoraDeviceTable::reserve(size_t bytes) {
  if (bytes <= device_.size()) return;
  copies_.wait();  // the old buffers may still be read by the previous copy
  size_t grown = std::max(bytes, device_.size() + device_.size() / 2);
  staging_ = StagingBuffer(grown, device_type_);
  device_ = Buffer::allocate(grown, device_type_, "LoRA slot table");
}

void LoraDeviceTable::upload(ops::LoraBatch* batch) {
  batch->device_runs = nullptr;
  batch->device_pairs = nullptr;
  if (batch->num_runs <= 0) return;
  if (batch->runs == nullptr || (batch->num_slots > 0 && batch->pairs == nullptr) ||
      batch->num_slots < 0 || batch->pairs_per_slot < 0) {
    raise<InvalidArgument>("LoraDeviceTable::upload: the batch has ", batch->num_runs,
                           " runs but no host runs or pairs (num_slots ", batch->num_slots,
                           ", pairs_per_slot ", batch->pairs_per_slot, ")");
  }
  const int64_t num_pairs =
      checked_mul(batch->num_slots, batch->pairs_per_slot, "LoRA slot table pairs");
  const size_t offset = pairs_offset(batch->num_runs);
  const size_t bytes = packed_bytes(batch->num_runs, num_pairs);
  reserve(bytes);
  copies_.wait();  // the previous step's copy has read the staging buffer
  auto* staging = static_cast<char*>(staging_.data());
  std::memcpy(staging, batch->runs, static_cast<size_t>(batch->num_runs) * sizeof(LoraRun));
  if (num_pairs > 0) {
    std::memcpy(staging + offset, batch->pairs, static_cast<size_t>(num_pairs) * sizeof(LoraPair));
  }
  copies_.copy(device_.data(), staging, bytes);
  copies_.record();
  ++uploads_;
  auto* base = static_cast<char*>(device_.data());
  batch->device_runs = reinterpret_cast<const LoraRun*>(base);
  batch->device_pairs = num_pairs > 0 ? reinterpret_cast<const LoraPair*>(base + offset) : nullptr;
}

}  // namespace lorart
