#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "core/errors.h"

namespace lorart {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kInt64:
      return 8;
  }
  raise<InvalidArgument>("unknown dtype code ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
  }
  return "unknown";
}

DType dtype_from_name(std::string_view name, std::string_view field) {
  if (name == "float32" || name == "fp32") return DType::kFloat32;
  if (name == "float16" || name == "fp16") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "int32") return DType::kInt32;
  if (name == "int64") return DType::kInt64;
  raise<InvalidArgument>(field, " must be one of float32, float16, bfloat16, int32, int64; got '",
                         name, "'");
}

const char* precision_name(Precision precision) {
  return precision == Precision::kBFloat16 ? "bfloat16" : "float32";
}

Precision precision_from_name(std::string_view name, std::string_view field) {
  if (name == "float32" || name == "fp32") return Precision::kFloat32;
  if (name == "bfloat16" || name == "bf16") return Precision::kBFloat16;
  raise<InvalidArgument>(field, " must be 'float32' (exact) or 'bfloat16'; got '", name, "'");
}

bool is_floating(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

namespace {

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent == 0) {
    // Zero or subnormal: value = mantissa * 2^-24, exact in float32.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or nan (keep nan quiet and non-zero)
    return sign | (abs_bits > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (abs_bits < 0x38800000u) {
    // Result is subnormal (or zero) in half: round |value| / 2^-24 to nearest even integer.
    const float scaled = std::ldexp(bits_float(abs_bits), 24);
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  // Normal: rebias exponent, round 23-bit mantissa to 10 bits, nearest even.
  const uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

float bfloat16_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bfloat16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

float load_float(const void* src, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(src)[i];
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(src)[i]);
    case DType::kBFloat16:
      return bfloat16_to_float(static_cast<const uint16_t*>(src)[i]);
    default:
      raise<InvalidArgument>("convert_floats: ", dtype_name(dtype), " is not a floating dtype");
  }
}

namespace {

void store_float(void* dst, DType dtype, size_t i, float value) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(dst)[i] = value;
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(dst)[i] = float_to_half(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(dst)[i] = float_to_bfloat16(value);
      return;
    default:
      raise<InvalidArgument>("convert_floats: ", dtype_name(dtype), " is not a floating dtype");
  }
}

}  // namespace

void convert_floats(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) {
  if (!is_floating(src_dtype) || !is_floating(dst_dtype)) {
    raise<InvalidArgument>("convert_floats: cannot convert ", dtype_name(src_dtype), " to ",
                           dtype_name(dst_dtype), " (floating dtypes only)");
  }
  if (count == 0) return;  // src / dst may then be null, which memmove does not allow
  if (src_dtype == dst_dtype) {
    std::memmove(dst, src, count * dtype_size(src_dtype));
    return;
  }
  // Widening to float32 is on the hot path (16-bit adapters of a long LoRA segment): plain loops
  // the compiler vectorises instead of a per-element dtype switch.
  if (dst_dtype == DType::kFloat32 && src_dtype == DType::kBFloat16) {
    const auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
    for (size_t i = 0; i < count; ++i) out[i] = bfloat16_to_float(in[i]);
    return;
  }
  if (dst_dtype == DType::kFloat32 && src_dtype == DType::kFloat16) {
    const auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
    for (size_t i = 0; i < count; ++i) out[i] = half_to_float(in[i]);
    return;
  }
  for (size_t i = 0; i < count; ++i) store_float(dst, dst_dtype, i, load_float(src, src_dtype, i));
}

}  // namespace lorart
