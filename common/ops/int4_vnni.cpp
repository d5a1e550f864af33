// int4 x int8 linear (W4A8) with per-row dynamic activation quantization on AVX512-VNNI
// (common/ops/w4a8_linear.py): llama.cpp's q4_0 x q8_0 product for the int4 scheme's weights.
// Builds only where the compiler targets VNNI (-march=native), so on other CPUs the dispatch
// table never offers it.
//
// W[n, k] = (q - 8) s + z per group of g input channels (q in 0..15) and x[m] ~ xq sx give
//   y[m, n] = sx[m] sum_g (s[n, g] sum_{k in g} q xq + (z - 8 s)[n, g] sum_{k in g} xq).
// vpdpbusd multiplies unsigned by signed bytes: q is the unsigned operand as it is. Each
// group's int32 dot (|.| <= 15 * 127 * g: exact in float) becomes float once, in its own
// lanes, times s; the group sums of xq come from quantizing the row (shared by all outputs),
// so the zero term is one dot over the groups per output.
//
// Layout (pack() in w4a8_linear.py): per output row, per chunk of 64 input channels, 32 bytes
// with byte j = q[j] | q[j + 32] << 4, so one 256-bit load broadcast to both halves, the upper
// half shifted right by 4, and 0x0F gives the chunk's 64 values in k order.
#include <immintrin.h>

#include <algorithm>

#include "convert.h"
#include "quant_rows.h"
#include "torch_op.h"
#include "weight_rows.h"

#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__)
#error "int4_vnni needs AVX512-VNNI, AVX512BW and AVX512DQ"
#endif

namespace {
constexpr int KB = 64;  // input channels per chunk: one vpdpbusd

inline __m512i unpack(const uint8_t* w) {
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)w));
  const __m512i hi = _mm512_mask_srli_epi16(v, 0xFFFF0000, v, 4);  // upper 32 bytes: q[j + 32]
  return _mm512_and_si512(hi, _mm512_set1_epi8(0x0F));
}

// MB activation rows (q [MB, Kp], scales xs, group sums qsum [MB, Gq]) against weight row w of
// output n with its scales s and zeros z [G], all accumulators in registers. A step is a group
// of g >= 64 channels (`chunks` = g / 64 chunks) or, for g = 32 (PAIR), one chunk of two
// groups: int32 lanes 0-7 hold its channels 0-31, lanes 8-15 channels 32-63.
template <int MB, bool PAIR, class T>
inline void rows(const int8_t* q, const float* xs, const int32_t* qsum, int64_t Gq,
                 const uint8_t* w, const T* s, const T* z, T* y, int64_t n, int64_t N, int64_t C,
                 int64_t G, int64_t chunks) {
  const int64_t Kp = C * KB;
  __m512 facc[MB];
  for (int i = 0; i < MB; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t c = 0, g = 0; c < C; c += chunks, g += PAIR ? 2 : 1) {
    __m512i acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t cc = c; cc < std::min(c + chunks, C); ++cc) {
      const __m512i wv = unpack(w + cc * (KB / 2));
      for (int i = 0; i < MB; ++i)  // q is zero-padded to Kp
        acc[i] = _mm512_dpbusd_epi32(acc[i], wv, _mm512_loadu_si512(q + i * Kp + cc * KB));
    }
    __m512 sv = _mm512_set1_ps(to_f32(s[g]));
    if constexpr (PAIR)  // an odd G's last chunk: its second group is padding, zero in q
      sv = _mm512_insertf32x8(sv, _mm256_set1_ps(g + 1 < G ? to_f32(s[g + 1]) : 0.f), 1);
    for (int i = 0; i < MB; ++i)
      facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), sv, facc[i]);
  }
  for (int64_t g = 0; g < G; g += 16) {  // the zero term: (z - 8 s) . (group sums of xq)
    const __mmask16 mk = tail16(G - g);
    const __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), load16(s + g, mk), load16(z + g, mk));
    for (int i = 0; i < MB; ++i) {  // sums of xq: |.| <= 127 * g, exact in float
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mk, qsum + i * Gq + g));
      facc[i] = _mm512_fmadd_ps(zc, sums, facc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) store(_mm512_reduce_add_ps(facc[i]) * xs[i], y + i * N + n);
}

template <bool PAIR, class T>
void mm(const QuantRows& r, const uint8_t* w, const T* scales, const T* zeros, T* y, int64_t M,
        int64_t N, int64_t K, int64_t group, int nthreads) {
  constexpr int MB = 8;
  const int64_t C = (K + KB - 1) / KB, Kp = C * KB, G = (K + group - 1) / group;
  const int64_t Gq = (Kp + group - 1) / group;  // group sums per quantized row (>= G)
  const int64_t chunks = PAIR ? 1 : group / KB;
  const int8_t* q = r.q.data();
  const float* xs = r.scale.data();
  const int32_t* qsum = r.qsum.data();
  for_each_weight_row(w, N, C * (KB / 2), nthreads, [&](const uint8_t* wn, int64_t n) {
    const T *s = scales + n * G, *z = zeros + n * G;
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      rows<MB, PAIR>(q + m * Kp, xs + m, qsum + m * Gq, Gq, wn, s, z, y + m * N, n, N, C, G,
                     chunks);
    switch (M - m) {  // the last rows, fewer than MB
#define TAIL(R)                                                                                \
  case R:                                                                                      \
    rows<R, PAIR>(q + m * Kp, xs + m, qsum + m * Gq, Gq, wn, s, z, y + m * N, n, N, C, G,      \
                  chunks);                                                                     \
    break;
      TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
      default: break;
    }
  });
}

template <class T>
void linear(const T* x, const uint8_t* w, const T* scales, const T* zeros, T* y, int64_t M,
            int64_t N, int64_t K, int64_t group, int nthreads) {
  const int64_t Kp = (K + KB - 1) / KB * KB;
  const QuantRows& r = quantize(x, (const T*)nullptr, M, K, Kp, group, nthreads);
  if (group == 32)
    mm<true>(r, w, scales, zeros, y, M, N, K, group, nthreads);
  else
    mm<false>(r, w, scales, zeros, y, M, N, K, group, nthreads);
}
}  // namespace

// x2d [M, K] float32/bfloat16, packed uint8 [N, ceil(K / 64) * 32] (w4a8_linear.py's pack),
// scales and zeros [N, ceil(K / g)] in x's dtype, g = 32 or a multiple of 64 -> [M, N] in x's
// dtype.
at::Tensor w4a8_vnni(const at::Tensor& x2d, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group_size) {
  const bool group_ok = group_size == 32 || (group_size > 0 && group_size % KB == 0);
  const int64_t K = x2d.dim() == 2 ? x2d.size(1) : 0, N = packed.dim() == 2 ? packed.size(0) : 0;
  const int64_t C = (K + KB - 1) / KB, G = group_ok ? (K + group_size - 1) / group_size : 0;
  const auto fits = [&](const at::Tensor& t) {
    return t.scalar_type() == x2d.scalar_type() && t.dim() == 2 && t.size(0) == N &&
           t.size(1) == G;
  };
  CHECK_ARG(op::float_or_bf16(x2d) && x2d.dim() == 2 && group_ok && packed.dim() == 2 &&
                packed.scalar_type() == at::kByte && packed.size(1) == C * (KB / 2) &&
                packed.is_contiguous() && fits(scales) && fits(zeros),
            "w4a8_vnni needs x [M, K] float32/bfloat16, a contiguous uint8 weight "
            "[N, ceil(K/64)*32], scales and zeros [N, ceil(K/g)] in x's dtype and g 32 or a "
            "multiple of 64; got x ",
            x2d.sizes(), " ", x2d.scalar_type(), ", weight ", packed.sizes(), " ",
            packed.scalar_type(), ", scales ", scales.sizes(), " ", scales.scalar_type(),
            ", zeros ", zeros.sizes(), " ", zeros.scalar_type(), ", g ", group_size);
  const at::Tensor x = x2d.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    linear(op::in<T>(x), op::in<uint8_t>(packed), op::in<T>(s), op::in<T>(z), op::out<T>(y),
           x.size(0), N, K, group_size, op::threads());
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def(
      "w4a8_vnni(Tensor x2d, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> "
      "Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("w4a8_vnni", w4a8_vnni); }
