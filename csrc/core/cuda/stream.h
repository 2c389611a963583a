// Thin wrappers over the CUDA runtime for pinned host memory, streams, events and asynchronous
// copies. Compiled only when the CUDA backend is built (LORART_WITH_CUDA); callers go through
// core/copy_stream.h, which falls back to plain host memory and synchronous copies without it.
// Handles are opaque pointers (cudaStream_t / cudaEvent_t) so this header needs no CUDA headers.
// Every failure throws DeviceError with the CUDA error string.
#pragma once

#include <cstddef>

namespace lorart::cuda {

void* host_alloc_pinned(size_t bytes);  // cudaHostAlloc, portable
void host_free_pinned(void* ptr) noexcept;
// A non-blocking stream on `device` (it does not wait on the legacy default stream); destroy and
// synchronise it with device_memory.h's stream_destroy / stream_synchronize.
void* stream_create_nonblocking(int device);
// An event without timing (cheaper to record and wait on).
void* event_create(int device);
void event_destroy(void* event) noexcept;
void event_record(void* event, void* stream);
void event_synchronize(void* event);
bool event_done(void* event);  // cudaEventQuery: true when complete
// Makes `stream` wait for `event` on the device (the host does not block).
void stream_wait_event(void* stream, void* event);
// Host-to-device copy queued on `stream`; `src` should be pinned for the copy to be async.
void memcpy_to_device_async(void* dst, const void* src, size_t bytes, void* stream);

}  // namespace lorart::cuda
