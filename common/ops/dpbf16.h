// Linear layers on AVX512-BF16 (vdpbf16ps: bf16 pairs multiplied exactly and summed in fp32),
// register-blocked for 1-16 activation rows so batched decode stays on one pass over the
// weights. Shared by int8_bf16dot.cpp and bf16dot.cpp, which differ only in how a weight row
// is loaded as bf16 and how a finished dot product becomes an output. Builds only where the
// CPU has AVX512-BF16: elsewhere g++ refuses it and the dispatch table runs torch.
#pragma once
#include <immintrin.h>

#include "channel_blocks.h"
#include "convert.h"

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

// MB rows of x against NB weight rows w[j]; finish(sum, n) turns output channel n's dot
// product into its value (a scale, a bias) before the one rounding to bf16.
template <class W, int MB, int NB, class Finish>
inline void block(const uint16_t* x, const typename W::T* const* w, const Finish& finish,
                  uint16_t* y, int64_t n0, int nb, int64_t N, int64_t K) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KB) {
    const __mmask32 mk = K - k >= KB ? ~0u : ((1u << (K - k)) - 1);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = W::load(w[j] + k, mk);
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = Bf16::load(x + i * K + k, mk);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < nb; ++j)
      store(finish(_mm512_reduce_add_ps(acc[i][j]), n0 + j), y + i * N + n0 + j);
}

template <class W, int NB, class Finish>
void rows_block(const uint16_t* x, const typename W::T* const* w, const Finish& finish,
                uint16_t* y, int64_t M, int64_t n0, int nb, int64_t N, int64_t K) {
  constexpr int MB = 16 / NB;
  int64_t m = 0;
  for (; m + MB <= M; m += MB) block<W, MB, NB>(x + m * K, w, finish, y + m * N, n0, nb, N, K);
  switch (M - m) {  // the last rows, fewer than MB
#define TAIL(R) case R: if constexpr (R < MB) block<W, R, NB>(x + m * K, w, finish, y + m * N, n0, nb, N, K); break;
    TAIL(1) TAIL(2) TAIL(3)
#undef TAIL
    default: break;
  }
}

// x [M, K] bf16, w [N, K] -> y [M, N] bf16. One row: 8 weight streams per block; more rows:
// 4, against up to 4 row blocks.
template <class W, class Finish>
void matmul(const uint16_t* x, const typename W::T* w, const Finish& finish, uint16_t* y,
            int64_t M, int64_t N, int64_t K, int nthreads) {
  using Rows = const typename W::T* const*;
  if (M == 1)
    for_channel_blocks<8>(w, N, K, nthreads, [&](Rows rows, int64_t n0, int nb) {
      block<W, 1, 8>(x, rows, finish, y, n0, nb, N, K);
    });
  else
    for_channel_blocks<4>(w, N, K, nthreads, [&](Rows rows, int64_t n0, int nb) {
      rows_block<W, 4>(x, rows, finish, y, M, n0, nb, N, K);
    });
}
}  // namespace dpbf16
