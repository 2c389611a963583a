// Pieces of the constructor-like __repr__ strings of the bound value types: numbers as Python
// writes them, strings quoted by Python itself, long token lists abbreviated. Call with the GIL.
#pragma once

#include <pybind11/pybind11.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <vector>

namespace lorart::bindings {

namespace py = pybind11;

// The shortest text that reads back as the same value ("0.9" for 0.9f, not 0.899999976), with
// Python's ".0" on whole numbers.
template <class Float>
std::string repr_float(Float value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string out(buffer, result.ptr);
  if (out.find_first_of(".ein") == std::string::npos) out += ".0";
  return out;
}

inline std::string repr_str(const std::string& value) {
  return py::repr(py::str(value)).cast<std::string>();
}

inline std::string repr_bool(bool value) { return value ? "True" : "False"; }

// "[1, 2, 3]"; past 8 ids the first 6 and the last 2: "[1, 2, 3, 4, 5, 6, ..., 19, 20]", then
// " (20 tokens)" when `count` is set.
inline std::string repr_tokens(const std::vector<int32_t>& ids, bool count = true) {
  constexpr size_t kFull = 8, kHead = 6, kTail = 2;
  std::string out = "[";
  auto add = [&](size_t i) {
    if (out.size() > 1) out += ", ";
    out += std::to_string(ids[i]);
  };
  if (ids.size() <= kFull) {
    for (size_t i = 0; i < ids.size(); ++i) add(i);
    return out + "]";
  }
  for (size_t i = 0; i < kHead; ++i) add(i);
  out += ", ...";
  for (size_t i = ids.size() - kTail; i < ids.size(); ++i) add(i);
  out += "]";
  if (count) out += " (" + std::to_string(ids.size()) + " tokens)";
  return out;
}

}  // namespace lorart::bindings
