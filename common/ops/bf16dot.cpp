// bf16 linear on AVX512-BF16 (common/ops/bf16_linear.py), through the register-blocked
// kernel of dpbf16.h: exact products, fp32 sums, the bias added to the fp32 sum, then one
// rounding to bf16. Masked loads take any K.
#include "dpbf16.h"

// x [M, K] bf16, w [N, K] bf16, bias [N] bf16 or null -> y [M, N] bf16.
extern "C" void linear_bf16(const void* x, const void* w, const void* bias, void* y, int64_t M,
                            int64_t N, int64_t K, int nthreads) {
  const auto* xb = (const uint16_t*)x;
  const auto* wb = (const uint16_t*)w;
  auto* yb = (uint16_t*)y;
  if (const auto* b = (const uint16_t*)bias) {
    const auto biased = [b](float sum, int64_t n) { return sum + to_f32(b[n]); };
    dpbf16::matmul<dpbf16::Bf16>(xb, wb, biased, yb, M, N, K, nthreads);
  } else {
    const auto plain = [](float sum, int64_t) { return sum; };
    dpbf16::matmul<dpbf16::Bf16>(xb, wb, plain, yb, M, N, K, nthreads);
  }
}
