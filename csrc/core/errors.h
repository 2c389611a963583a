// Typed exceptions thrown inside the core. The binding layer (csrc/bindings/) translates each to a
// Python exception with the message intact: InvalidArgument -> ValueError, LoraError ->
// lorart.LoraError (a ValueError), DeviceError -> lorart.DeviceError (a RuntimeError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lorart {

// Base of every error the core raises on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The caller passed something the core cannot accept (shape, dtype, range, name).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A LoRA adapter (weights, config, task) is malformed or does not fit the model.
class LoraError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

// A device (CUDA) call failed, or a device was asked for that this build or machine lacks.
class DeviceError : public Error {
 public:
  using Error::Error;
};

// Builds a message from streamable parts: raise<LoraError>("row ", i, ": rank ", r, " > ", max).
template <class E, class... Parts>
[[noreturn]] void raise(Parts&&... parts) {
  std::ostringstream message;
  (message << ... << std::forward<Parts>(parts));
  throw E(message.str());
}

}  // namespace lorart
