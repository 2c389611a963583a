// The ops' device rules, which need no GPU: a tensor on another device than the context's is
// refused by name, and a CUDA context in a build without the CUDA backend is a DeviceError.
#include <gtest/gtest.h>

#include <vector>

#include "core/errors.h"
#include "kernels/ops.h"
#include "test_util.h"

namespace lorart {
namespace {

using testing_util::expect_error;

ExecContext cuda_context() {
  ExecContext ctx;
  ctx.device = Device::cuda();
  return ctx;
}

// Host memory labelled as CUDA never reaches a kernel: the ops refuse it before reading it.
TEST(OpsDeviceTest, ATensorOnAnotherDeviceIsRefusedByName) {
  std::vector<float> f(16);
  const Tensor host(f.data(), DType::kFloat32, {2, 8});
  const Tensor weight(f.data(), DType::kFloat32, {8});
  expect_error<InvalidArgument>(
      [&] { ops::rms_norm(cuda_context(), host, weight, 1e-6f, host); },
      "rms_norm: every tensor must be on the context's device cuda:0, got one on cpu");
  const Tensor device_x(f.data(), DType::kFloat32, {2, 8}, Device::cuda());
  expect_error<InvalidArgument>(
      [&] { ops::linear(ExecContext::cpu(), device_x, host, host); },
      "linear: every tensor must be on the context's device cpu, got one on cuda:0");
}

TEST(OpsDeviceTest, ACudaContextNeedsTheCudaBackend) {
  if (LORART_WITH_CUDA) GTEST_SKIP() << "this build has the CUDA backend";
  std::vector<float> f(16);
  const Tensor x(f.data(), DType::kFloat32, {2, 8}, Device::cuda());
  const Tensor w(f.data(), DType::kFloat32, {8, 8}, Device::cuda());
  const Tensor v(f.data(), DType::kFloat32, {8}, Device::cuda());
  const Tensor ids(f.data(), DType::kInt32, {2}, Device::cuda());
  const char* no_backend = "this build has no CUDA backend";
  expect_error<DeviceError>([&] { ops::linear(cuda_context(), x, w, x); }, no_backend);
  expect_error<DeviceError>([&] { ops::rms_norm(cuda_context(), x, v, 1e-6f, x); }, no_backend);
  expect_error<DeviceError>([&] { ops::embedding(cuda_context(), w, ids, x); }, no_backend);
  expect_error<DeviceError>([&] { ops::add(cuda_context(), x, x); }, no_backend);
}

}  // namespace
}  // namespace lorart
