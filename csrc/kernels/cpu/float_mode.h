// The calling thread's floating-point mode for every OpenMP worker of a parallel region. The
// SSE control word (flush-to-zero, denormals-are-zero, rounding) is per thread: a library in the
// process may set it on one thread only (torch.set_flush_denormal does), and OpenMP workers keep
// the mode they started with. Which thread computes an output depends on the batch size and the
// thread count, so without this a denormal intermediate could round differently in another
// batch. Only csrc/kernels/cpu/ includes this.
#pragma once

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace lorart::cpu {

class FloatMode {
 public:
  // Captures the calling thread's mode (construct before the parallel region).
  FloatMode() {
#if defined(__SSE__)
    csr_ = _mm_getcsr();
#endif
  }

  // Inside the region: this thread computes in the captured mode until the scope ends.
  class Scope {
   public:
    explicit Scope(const FloatMode& mode) {
#if defined(__SSE__)
      saved_ = _mm_getcsr();
      if (saved_ != mode.csr_) _mm_setcsr(mode.csr_);
#endif
      (void)mode;
    }
    ~Scope() {
#if defined(__SSE__)
      if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
#endif
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    unsigned int saved_ = 0;
  };

 private:
  unsigned int csr_ = 0;
};

}  // namespace lorart::cpu
