// Element types the core understands, their sizes and names, and the CPU conversions between the
// floating-point ones (fp16/bf16 stored as raw 16-bit words; rounding is round-to-nearest-even).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lorart {

enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64 };

size_t dtype_size(DType dtype);
// "float32", "float16", "bfloat16", "int32", "int64".
const char* dtype_name(DType dtype);
// Inverse of dtype_name; also accepts "fp32", "fp16", "bf16". Throws InvalidArgument naming
// `field`.
DType dtype_from_name(std::string_view name, std::string_view field = "dtype");
bool is_floating(DType dtype);

float half_to_float(uint16_t bits);
uint16_t float_to_half(float value);
float bfloat16_to_float(uint16_t bits);
uint16_t float_to_bfloat16(float value);

// How the matmuls of a forward compute (ExecutorConfig::precision; the CPU kernels' contract).
enum class Precision : int8_t {
  kFloat32,   // exact: float32 products and sums in one fixed order (batch invariant)
  kBFloat16,  // activations rounded to bfloat16, bf16 dot products, float32 sums (fixed order)
};
// "float32" / "bfloat16".
const char* precision_name(Precision precision);
// Inverse of precision_name; throws InvalidArgument naming `field` otherwise.
Precision precision_from_name(std::string_view name, std::string_view field = "precision");

// Element i of a contiguous floating array of `dtype`, widened to float (exact).
float load_float(const void* src, DType dtype, size_t i);
// Converts `count` contiguous elements between floating dtypes (any pair, including equal ones).
void convert_floats(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count);

}  // namespace lorart
