#include "executor/request.h"

#include <cmath>

#include "core/errors.h"

namespace lorart {

void SamplingConfig::validate() const {
  if (top_k < 0) raise<InvalidArgument>("sampling_config.top_k must be >= 0, got ", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    raise<InvalidArgument>("sampling_config.top_p must be in (0, 1], got ", top_p);
  }
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    raise<InvalidArgument>("sampling_config.temperature must be a finite value >= 0, got ",
                           temperature);
  }
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNotFinished:
      return "not_finished";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEndId:
      return "end_id";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kNone:
      return "none";
    case ErrorKind::kInvalidRequest:
      return "invalid_request";
    case ErrorKind::kInternal:
      return "internal";
  }
  return "unknown";
}

}  // namespace lorart
