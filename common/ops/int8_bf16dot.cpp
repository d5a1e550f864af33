// int8 weight-only linear for bf16 activations on AVX512-BF16 (common/ops/int8_linear.py),
// through the register-blocked kernel of dpbf16.h. Each weight is widened to bf16 (exact:
// |w| <= 128 fits bf16's 8-bit mantissa) and vdpbf16ps multiplies pairs in fp32 (bf16 x bf16
// products are exact in fp32): the same math as int8_matvec.cpp, in another summation order.
#include "dpbf16.h"

namespace {
struct Int8 {
  using T = int8_t;
  static __m512bh load(const int8_t* w, __mmask32 m) {
    const __m256i b = _mm256_maskz_loadu_epi8(m, w);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);  // exact: small integers
  }
};
}  // namespace

// x [M, K] bf16, w [N, K] int8, scale [N] bf16 -> y [M, N] bf16.
extern "C" void matmul_bf16(const void* x, const int8_t* w, const void* scale, void* y, int64_t M,
                            int64_t N, int64_t K, int nthreads) {
  const auto* s = (const uint16_t*)scale;
  const auto scaled = [s](float sum, int64_t n) { return sum * to_f32(s[n]); };
  dpbf16::matmul<Int8>((const uint16_t*)x, w, scaled, (uint16_t*)y, M, N, K, nthreads);
}
