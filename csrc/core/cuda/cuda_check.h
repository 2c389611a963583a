// Error checks for CUDA runtime calls and kernel launches, for the .cu files of the CUDA backend
// (compiled only when LORART_WITH_CUDA). A failure throws DeviceError naming the call (or the
// kernel) and CUDA's error name and text, and clears the non-sticky error so later calls run.
#pragma once

#include <cuda_runtime.h>

namespace lorart::cuda {

// Throws DeviceError "<what> failed: <name> (<text>)" unless status is cudaSuccess.
void check(cudaError_t status, const char* what);
// After a launch: throws DeviceError naming `kernel` if the launch was refused (bad
// configuration, too much shared memory). Asynchronous faults surface at the next synchronising
// call's check.
void check_launch(const char* kernel);

}  // namespace lorart::cuda

#define LORART_CUDA_CHECK(expr) ::lorart::cuda::check((expr), #expr)
