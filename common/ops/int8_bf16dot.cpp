// int8 weight-only linear for bf16 activations on AVX512-BF16 (common/ops/int8_linear.py),
// register-blocked for 1-16 rows so batched decode stays on one pass over the weights.
// Each weight is widened to bf16 (exact: |w| <= 128 fits bf16's 8-bit mantissa) and vdpbf16ps
// multiplies pairs in fp32 (bf16 x bf16 products are exact in fp32): the same math as
// int8_matvec.cpp, in another summation order. Builds only where the CPU has AVX512-BF16.
#include <immintrin.h>

#include "convert.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "int8_bf16dot needs AVX512-BF16 and AVX512BW"
#endif

namespace {
constexpr int KB = 32;  // weights per vdpbf16ps step

inline __m512bh widen(const int8_t* w, __mmask32 m) {
  const __m256i b = _mm256_maskz_loadu_epi8(m, w);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // exact: small integers
}

template <int MB, int NB>
inline void block(const uint16_t* x, const int8_t* const* w, const uint16_t* scale, uint16_t* y,
                  int64_t n0, int nb, int64_t N, int64_t K) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KB) {
    const __mmask32 mk = K - k >= KB ? ~0u : ((1u << (K - k)) - 1);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = widen(w[j] + k, mk);
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < nb; ++j)
      store(_mm512_reduce_add_ps(acc[i][j]) * to_f32(scale[n0 + j]), y + i * N + n0 + j);
}

template <int NB>
void rows_block(const uint16_t* x, const int8_t* const* w, const uint16_t* scale, uint16_t* y,
                int64_t M, int64_t n0, int nb, int64_t N, int64_t K) {
  constexpr int MB = 16 / NB;
  int64_t m = 0;
  for (; m + MB <= M; m += MB) block<MB, NB>(x + m * K, w, scale, y + m * N, n0, nb, N, K);
  switch (M - m) {  // the last rows, fewer than MB
#define TAIL(R) case R: if constexpr (R < MB) block<R, NB>(x + m * K, w, scale, y + m * N, n0, nb, N, K); break;
    TAIL(1) TAIL(2) TAIL(3)
#undef TAIL
    default: break;
  }
}
}  // namespace

// x [M, K] bf16, w [N, K] int8, scale [N] bf16 -> y [M, N] bf16. Threads split the output
// channels in contiguous ranges, each streaming its part of the weights once.
extern "C" void matmul_bf16(const void* x, const int8_t* w, const void* scale, void* y, int64_t M,
                            int64_t N, int64_t K, int nthreads) {
  const bool one = M == 1;  // one row: 8 weight streams; more rows: 4 x up to 4 row blocks
  const int NB = one ? 8 : 4;
  const int64_t blocks = (N + NB - 1) / NB;
  const auto* xb = (const uint16_t*)x;
  const auto* sb = (const uint16_t*)scale;
  auto* yb = (uint16_t*)y;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * NB;
    const int nb = int(N - n0 < NB ? N - n0 : NB);
    const int8_t* rows[8];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + (j < nb ? j : 0)) * K;  // tail: re-read row 0
    if (one)
      block<1, 8>(xb, rows, sb, yb, n0, nb, N, K);
    else
      rows_block<4>(xb, rows, sb, yb, M, n0, nb, N, K);
  }
}
