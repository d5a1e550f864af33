// Linear layers on AVX512-BF16 (vdpbf16ps: bf16 pairs multiplied exactly and summed in fp32),
// one sequential weight stream per thread, register-blocked for up to 8 activation rows so
// batched decode stays on one pass over the weights. Shared by int8_bf16dot.cpp and
// bf16dot.cpp, which differ only in how a weight row is loaded as bf16 and how a finished dot
// product becomes an output. Builds only where the CPU has AVX512-BF16: elsewhere g++ refuses
// it and the dispatch table runs torch.
#pragma once
#include <immintrin.h>

#include <algorithm>

#include "convert.h"
#include "weight_rows.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "vdpbf16ps kernels need AVX512-BF16 and AVX512BW"
#endif

namespace dpbf16 {
constexpr int KB = 32;  // elements per vdpbf16ps step

// A weight loader: `T`, the stored element, and load(w, mask), 32 of them as bf16 pairs
// (masked-off lanes zero, so a K tail adds nothing). Bf16 also loads the activations.
struct Bf16 {
  using T = uint16_t;
  static __m512bh load(const uint16_t* p, __mmask32 m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
  }
};

// acc[i] += row i of x . w over columns [k0, k1) (k1 - k0 a multiple of KB unless k1 = K).
template <class W, int MB>
inline void dot(const uint16_t* x, const typename W::T* w, __m512* acc, int64_t K, int64_t k0,
                int64_t k1) {
  for (int64_t k = k0; k < k1; k += KB) {
    const __mmask32 mk = k1 - k >= KB ? ~0u : ((1u << (k1 - k)) - 1);
    const __m512bh wv = W::load(w + k, mk);
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], Bf16::load(x + i * K + k, mk), wv);
  }
}

// MB rows of x against weight row w (output channel n); finish(sum, n) turns the dot product
// into its value (a scale, a bias) before the one rounding to bf16. With group < K the sum is
// taken per group of `group` columns (a multiple of KB) and each partial sum weighed by
// scale(n, group index) first (group-wise quantization scales).
template <class W, int MB, class Finish, class Scale>
inline void rows(const uint16_t* x, const typename W::T* w, const Finish& finish,
                 const Scale& scale, int64_t group, uint16_t* y, int64_t n, int64_t N, int64_t K) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  if (group >= K) {
    dot<W, MB>(x, w, acc, K, 0, K);
  } else {
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      __m512 part[MB];
      for (int i = 0; i < MB; ++i) part[i] = _mm512_setzero_ps();
      dot<W, MB>(x, w, part, K, k0, std::min(K, k0 + group));
      const __m512 s = _mm512_set1_ps(scale(n, k0 / group));
      for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) store(finish(_mm512_reduce_add_ps(acc[i]), n), y + i * N + n);
}

// x [M, K] bf16, w [N, K] -> y [M, N] bf16: each weight row is loaded once for up to MB
// activation rows (register-blocked), so batched decode reads the weights once per step.
// group/scale: rows' group-wise partial sums (group >= K: none).
template <class W, class Finish, class Scale>
void matmul(const uint16_t* x, const typename W::T* w, const Finish& finish, const Scale& scale,
            int64_t group, uint16_t* y, int64_t M, int64_t N, int64_t K, int nthreads) {
  constexpr int MB = 8;
  for_each_weight_row(w, N, K, nthreads, [&](const typename W::T* wn, int64_t n) {
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      rows<W, MB>(x + m * K, wn, finish, scale, group, y + m * N, n, N, K);
    switch (M - m) {  // the last rows, fewer than MB
#define TAIL(R) case R: rows<W, R>(x + m * K, wn, finish, scale, group, y + m * N, n, N, K); break;
      TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
      default: break;
    }
  });
}

// The same with no groups: finish alone makes each output.
template <class W, class Finish>
void matmul(const uint16_t* x, const typename W::T* w, const Finish& finish, uint16_t* y,
            int64_t M, int64_t N, int64_t K, int nthreads) {
  const auto unused = [](int64_t, int64_t) { return 1.f; };
  matmul<W>(x, w, finish, unused, K, y, M, N, K, nthreads);
}
}  // namespace dpbf16
