// Per-row (per-token) dynamic int8 quantization of activations, shared by the VNNI kernels
// (int8_vnni.cpp, int4_vnni.cpp): the same float ops in the same order as quantize_rows() in
// w8a8_linear.py, so the two agree exactly. In an unnamed namespace: each kernel library keeps
// its own copy (and its own buffers) rather than sharing exported symbols with another.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

// q[m, :] = rint(xs * (127 / max|xs|)), xs = x[m, :] * smooth (if any), zero-padded to Kp;
// scale[m] = max|xs| / 127; qsum[m, j] = sum of q[m, k] over the j-th `group` channels
// (group a multiple of 16; ceil(Kp / group) sums per row).
template <class T>
void quant_rows(const T* x, const T* smooth, int8_t* q, float* scale, int32_t* qsum, int64_t M,
                int64_t K, int64_t Kp, int64_t group, int nthreads) {
  const int64_t G = (Kp + group - 1) / group;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 4)
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 mk = tail16(K - k);
      __m512 v = load16(xm + k, mk);
      if (smooth) v = _mm512_mul_ps(v, load16(smooth + k, mk));
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    float amax = _mm512_reduce_max_ps(vmax);
    if (amax < 1e-8f) amax = 1e-8f;  // an all-zero row quantizes to zeros
    const float inv = 127.f / amax;
    scale[m] = amax / 127.f;
    int8_t* qm = q + m * Kp;
    for (int64_t g = 0; g < G; ++g) {
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t k = g * group; k < Kp && k < (g + 1) * group; k += 16) {
        __mmask16 mk = tail16(K - k);  // past K: zeros
        __m512 v = load16(xm + k, mk);
        if (smooth) v = _mm512_mul_ps(v, load16(smooth + k, mk));
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // nearest even
        vsum = _mm512_add_epi32(vsum, r);
        _mm_storeu_si128((__m128i*)(qm + k), _mm512_cvtsepi32_epi8(r));
      }
      qsum[m * G + g] = _mm512_reduce_add_epi32(vsum);
    }
  }
}

// The quantized rows of one call, in buffers kept per thread across calls (no allocation per
// decode step): q [M, Kp], scale [M], qsum [M, ceil(Kp / group)].
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> qsum;
};

template <class T>
const QuantRows& quantize(const T* x, const T* smooth, int64_t M, int64_t K, int64_t Kp,
                          int64_t group, int nthreads) {
  static thread_local QuantRows s;
  s.q.resize(M * Kp);
  s.scale.resize(M);
  s.qsum.resize(M * ((Kp + group - 1) / group));
  quant_rows(x, smooth, s.q.data(), s.scale.data(), s.qsum.data(), M, K, Kp, group, nthreads);
  return s;
}
}  // namespace
