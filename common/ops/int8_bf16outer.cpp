// int8 weight-only linear for bf16 activations on AVX512-BF16 (common/ops/int8_linear.py), as
// outer products: 16 weight rows x 32 columns are loaded, transposed in registers into 16
// vectors of (16 output channels x one column pair), widened to bf16, and each vector feeds
// one vdpbf16ps per activation row with that row's column pair broadcast. Against the dot
// form of int8_bf16dot.cpp, no output ends with a horizontal sum, and the activations are
// read once per 16 output channels instead of once per channel, which is what bounds the dot
// form at 8-16 rows. Same math: exact products summed in fp32, one rounding at the end.
#include <immintrin.h>

#include <algorithm>

#include "convert.h"
#include "torch_op.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "vdpbf16ps kernels need AVX512-BF16 and AVX512BW"
#endif

namespace {
constexpr int NB = 16;  // output channels per block: one fp32 accumulator vector
constexpr int KB = 32;  // columns per step: 16 pairs, one per transposed vector
// Bytes ahead each weight row is prefetched: 16 rows read side by side are 16 streams per
// thread, more than the hardware prefetcher follows well (a generic distance, not tuned).
constexpr int PF = 1024;

__m512bh widen(__m256i b) {  // 32 int8 -> 32 bf16, exact: small integers
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// r[0..7]: 8 rows of 16 column pairs (16-bit words) -> c[p] = [rows 0-7 of pair p | rows 0-7
// of pair p + 8] (unpack works within 128-bit lanes).
void transpose8(const __m256i* r, __m256i* c) {
  __m256i a[8], b[8];
  for (int i = 0; i < 4; ++i) {  // a[2i], a[2i+1]: rows 2i, 2i+1 interleaved, pairs 0-3 / 4-7
    a[2 * i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)      // b[4h + q]: rows 4h..4h+3 of pairs 2q, 2q+1
    for (int j = 0; j < 2; ++j) {
      b[4 * h + 2 * j] = _mm256_unpacklo_epi32(a[4 * h + j], a[4 * h + j + 2]);
      b[4 * h + 2 * j + 1] = _mm256_unpackhi_epi32(a[4 * h + j], a[4 * h + j + 2]);
    }
  for (int q = 0; q < 4; ++q) {
    c[2 * q] = _mm256_unpacklo_epi64(b[q], b[4 + q]);
    c[2 * q + 1] = _mm256_unpackhi_epi64(b[q], b[4 + q]);
  }
}

// One step of KB columns from column k (`width` of them, all KB unless the last): the
// transposed weight vectors against every row's broadcast column pairs.
template <int MB, bool Full, bool AllRows>
inline void step(const uint16_t* x, const int8_t* w, int rows, int64_t K, int64_t k,
                 int64_t width, __m512* acc) {
  const __mmask32 mk = Full ? ~0u : (1u << width) - 1;
  __m256i r[NB], lo[8], hi[8];
  if (Full && AllRows && k % 64 == 0)  // once per cache line
    for (int i = 0; i < NB; ++i) _mm_prefetch((const char*)(w + i * K + k + PF), _MM_HINT_T0);
  for (int i = 0; i < NB; ++i)  // missing rows and columns load as zeros (masked: no fault)
    r[i] = Full && AllRows ? _mm256_loadu_si256((const __m256i*)(w + i * K + k))
                              : _mm256_maskz_loadu_epi8(i < rows ? mk : 0, w + i * K + k);
  transpose8(r, lo);
  transpose8(r + 8, hi);
  for (int p = 0; p < KB / 2 && (Full || 2 * p < width); ++p) {  // vector p: pair p
    const __m256i half = p < 8 ? _mm256_permute2x128_si256(lo[p % 8], hi[p % 8], 0x20)
                               : _mm256_permute2x128_si256(lo[p % 8], hi[p % 8], 0x31);
    const __m512bh wv = widen(half);
    for (int i = 0; i < MB; ++i) {
      __m512i xv;  // the bf16 pair (x[k+2p], x[k+2p+1]) in every lane; past an odd K's end, zero
      if (Full || 2 * p + 1 < width)
        xv = _mm512_broadcastd_epi32(_mm_loadu_si32(x + i * K + k + 2 * p));
      else
        xv = _mm512_set1_epi32(x[i * K + k + 2 * p]);
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)xv, wv);
    }
  }
}

// MB activation rows x one block of `rows` (<= 16) weight rows starting at w (row stride K),
// whose scales are scale[c * groups + g] for channel c of the block and group g of `group`
// columns (a multiple of KB, or K: one scale per channel): each group's partial sums are
// weighed by their 16 scales, then rounded to bf16 once.
template <int MB, bool AllRows>
void block(const uint16_t* x, const int8_t* w, int rows, const uint16_t* scale, int64_t groups,
           int64_t group, uint16_t* y, int64_t N, int64_t K) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += group) {
    const int64_t k1 = std::min(K, k0 + group);
    __m512 part[MB];
    for (int i = 0; i < MB; ++i) part[i] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + KB <= k1; k += KB) step<MB, true, AllRows>(x, w, rows, K, k, KB, part);
    if (k < k1) step<MB, false, AllRows>(x, w, rows, K, k, k1 - k, part);
    alignas(64) float s[NB] = {};  // missing channels' scales stay zero
    for (int c = 0; c < rows; ++c) s[c] = to_f32(scale[c * groups + k0 / group]);
    const __m512 sv = _mm512_load_ps(s);
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(part[i], sv, acc[i]);
  }
  const __mmask16 mn = rows == NB ? 0xFFFF : (1u << rows) - 1;
  for (int i = 0; i < MB; ++i)
    _mm256_mask_storeu_epi16(y + i * N, mn, (__m256i)_mm512_cvtneps_pbh(acc[i]));
}

template <int MB>
void rows_of(const uint16_t* x, const int8_t* w, const uint16_t* scale, int64_t groups,
             int64_t group, uint16_t* y, int64_t N, int64_t K, int64_t n) {
  const uint16_t* sn = scale + n * groups;
  if (N - n >= NB)
    block<MB, true>(x, w + n * K, NB, sn, groups, group, y + n, N, K);
  else  // the last channels, fewer than 16
    block<MB, false>(x, w + n * K, int(N - n), sn, groups, group, y + n, N, K);
}
}  // namespace

// x2d [M, K] bf16, weight_int8 [N, K] contiguous, scales [N] or [N, ceil(K / g)] (group_size
// g) bf16 -> [M, N] bf16.
at::Tensor int8_bf16outer_cpp(const at::Tensor& x2d, const at::Tensor& weight_int8,
                              const at::Tensor& scales, int64_t group_size) {
  at::Tensor y = op::linear_out("int8_bf16outer_cpp", x2d, weight_int8, at::kChar, nullptr);
  const int64_t group =
      op::scale_group("int8_bf16outer_cpp", x2d, weight_int8, scales, group_size);
  CHECK_ARG(x2d.scalar_type() == at::kBFloat16, "int8_bf16outer_cpp needs bfloat16 x, got ",
            x2d.scalar_type());
  const at::Tensor x = x2d.contiguous(), s = scales.contiguous();
  const uint16_t *xp = op::in<uint16_t>(x), *sp = op::in<uint16_t>(s);
  const int8_t* wp = op::in<int8_t>(weight_int8);
  uint16_t* yp = op::out<uint16_t>(y);
  const int64_t M = x.size(0), N = y.size(1), K = x.size(1), G = s.dim() == 2 ? s.size(1) : 1;
  // Threads split the blocks of 16 output channels; each block is read once for all rows.
#pragma omp parallel for num_threads(op::threads()) schedule(static)
  for (int64_t n = 0; n < N; n += NB) {
    int64_t m = 0;
    for (; m + NB <= M; m += NB) rows_of<NB>(xp + m * K, wp, sp, G, group, yp + m * N, N, K, n);
    switch (M - m) {  // the last rows, fewer than 16
#define TAIL(R) case R: rows_of<R>(xp + m * K, wp, sp, G, group, yp + m * N, N, K, n); break;
      TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8)
      TAIL(9) TAIL(10) TAIL(11) TAIL(12) TAIL(13) TAIL(14) TAIL(15)
#undef TAIL
      default: break;
    }
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("int8_bf16outer_cpp(Tensor x2d, Tensor weight_int8, Tensor scales, int group_size=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("int8_bf16outer_cpp", int8_bf16outer_cpp); }
