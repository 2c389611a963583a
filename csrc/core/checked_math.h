// Checked int64 arithmetic for sizes computed from user input (config.json fields, pool sizes,
// workspace rows). A product or sum that does not fit throws InvalidArgument naming what was being
// computed, its operands and the limit, instead of wrapping into a small (or zero) allocation.
// Header-only; any code in the core may use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string_view>
#include <utility>

#include "core/errors.h"

namespace lorart {

inline constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
inline constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// a * b for sizes (both >= 0); `what` names the quantity ("KV cache bytes").
inline int64_t checked_mul(int64_t a, int64_t b, std::string_view what) {
  int64_t out = 0;
  if (a < 0 || b < 0) raise<InvalidArgument>(what, ": negative size ", a < 0 ? a : b);
  if (__builtin_mul_overflow(a, b, &out)) {
    raise<InvalidArgument>(what, " = ", a, " * ", b, " overflows int64 (limit ", kInt64Max, ")");
  }
  return out;
}

// a + b for sizes (both >= 0).
inline int64_t checked_add(int64_t a, int64_t b, std::string_view what) {
  int64_t out = 0;
  if (a < 0 || b < 0) raise<InvalidArgument>(what, ": negative size ", a < 0 ? a : b);
  if (__builtin_add_overflow(a, b, &out)) {
    raise<InvalidArgument>(what, " = ", a, " + ", b, " overflows int64 (limit ", kInt64Max, ")");
  }
  return out;
}

// The product of every factor; the message lists them all ("3 * 2 * 2251799813685248 * ...").
inline int64_t checked_product(std::initializer_list<int64_t> factors, std::string_view what) {
  int64_t out = 1;
  bool overflow = false;
  for (int64_t f : factors) {
    if (f < 0) raise<InvalidArgument>(what, ": negative size ", f);
    if (f == 0) return 0;  // the product is 0 even where a prefix of it overflows
  }
  for (int64_t f : factors) overflow = __builtin_mul_overflow(out, f, &out) || overflow;
  if (overflow) {
    std::ostringstream terms;
    const char* sep = "";
    for (int64_t f : factors) terms << std::exchange(sep, " * ") << f;
    raise<InvalidArgument>(what, " = ", terms.str(), " overflows int64 (limit ", kInt64Max, ")");
  }
  return out;
}

}  // namespace lorart
