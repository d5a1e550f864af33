// int8 x int8 linear with per-row dynamic activation quantization on AVX512-VNNI
// (common/ops/w8a8_linear.py). Builds only where the compiler targets VNNI (-march=native),
// so on other CPUs the dispatch table never offers it.
//
// vpdpbusd multiplies unsigned by signed bytes. Weights are stored signed; XOR 0x80 turns w into
// the unsigned w + 128, so sum_k (w + 128) x = sum_k w x + 128 sum_k x, and the second term is
// the activation row sum, known from quantizing the row: one subtraction per output.
#include <immintrin.h>

#include <type_traits>
#include <vector>

#include "convert.h"
#include "quant_rows.h"
#include "weight_rows.h"
#include "torch_op.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/from_blob.h>

#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "int8_vnni needs AVX512-VNNI and AVX512BW"
#endif

namespace {
constexpr int KB = 64;  // bytes per vpdpbusd step

// MB activation rows against weight row w (output channel n), all accumulators in registers.
template <int MB, class T>
inline void rows(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w,
                 const T* ws, T* y, int64_t n, int64_t N, int64_t K, int64_t Kp) {
  __m512i acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t k = 0; k < Kp; k += KB) {
    const __mmask64 mk = K - k >= KB ? ~0ULL : ((1ULL << (K - k)) - 1);
    const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + k), flip);
    for (int i = 0; i < MB; ++i)  // q is zero-padded to Kp
      acc[i] = _mm512_dpbusd_epi32(acc[i], wv, _mm512_loadu_si512(q + i * Kp + k));
  }
  for (int i = 0; i < MB; ++i) {
    const int32_t dot = _mm512_reduce_add_epi32(acc[i]) - 128 * qsum[i];
    if constexpr (std::is_same_v<T, int32_t>)
      y[i * N + n] = dot;  // the integer product alone (tests)
    else
      store(float(dot) * (xs[i] * to_f32(ws[n])), y + i * N + n);
  }
}

// y[m, n] = (sum_k q[m, k] w[n, k]) * (xs[m] * ws[n]); each weight row is loaded once for up
// to MB activation rows.
template <class T>
void mm(const int8_t* q, const float* xs, const int32_t* qsum, const int8_t* w, const T* ws, T* y,
        int64_t M, int64_t N, int64_t K, int64_t Kp, int nthreads) {
  constexpr int MB = 8;
  for_each_weight_row(w, N, K, nthreads, [&](const int8_t* wn, int64_t n) {
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      rows<MB>(q + m * Kp, xs + m, qsum + m, wn, ws, y + m * N, n, N, K, Kp);
    switch (M - m) {  // the last rows, fewer than MB
#define TAIL(R) case R: rows<R>(q + m * Kp, xs + m, qsum + m, wn, ws, y + m * N, n, N, K, Kp); break;
      TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
      default: break;
    }
  });
}

template <class T>
void linear(const T* x, const T* smooth, const int8_t* w, const T* ws, T* y, int64_t M, int64_t N,
            int64_t K, int nthreads) {
  const int64_t Kp = (K + KB - 1) / KB * KB;
  const QuantRows& r = quantize(x, smooth, M, K, Kp, Kp, nthreads);  // one sum per row
  mm(r.q.data(), r.scale.data(), r.qsum.data(), w, ws, y, M, N, K, Kp, nthreads);
}

// y[m, n] = acc[m, n] * (xs[m] * ws[n]) in x's dtype, 16 outputs at a time: the GEMM's
// products (int32 from _int_mm, or the same integers as float from oneDNN) scaled in the
// float ops rows<> uses. Without reassociation (the build allows it): (acc * xs) * ws would
// round differently.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
inline __m512 load_acc(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_acc(const int32_t* p, __mmask16 m) {  // float(int32), nearest even
  return _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, p));
}

inline void store16(__m512 v, float* d, __mmask16 m) { _mm512_mask_storeu_ps(d, m, v); }
inline void store16(__m512 v, uint16_t* d, __mmask16 m) {  // bf16, nearest even, as store()
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_mask_storeu_epi16(d, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

template <class A, class T>
void scale_rows(const A* acc, const float* xs, const T* ws, T* y, int64_t M, int64_t N,
                int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N > (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const __m512 s = _mm512_set1_ps(xs[m]);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mk = tail16(N - n);
      const __m512 a = load_acc(acc + m * N + n, mk);
      store16(_mm512_mul_ps(a, _mm512_mul_ps(s, load16(ws + n, mk))), y + m * N + n, mk);
    }
  }
}
#pragma GCC pop_options
}  // namespace

// A w8a8 op's arguments, checked and contiguous, and its output.
struct W8A8Args {
  at::Tensor y, x, ws;
  std::optional<at::Tensor> sm;
};

// x2d [M, K] float32/bfloat16, weight_int8 [N, K] contiguous, scales [N] and smooth [K] (or
// None) in x's dtype -> [M, N] in x's dtype.
W8A8Args w8a8_args(const char* name, const at::Tensor& x2d, const at::Tensor& weight_int8,
                   const at::Tensor& scales, const std::optional<at::Tensor>& smooth) {
  at::Tensor y = op::linear_out(name, x2d, weight_int8, at::kChar, &scales);
  CHECK_ARG(!smooth || (smooth->scalar_type() == x2d.scalar_type() && smooth->dim() == 1 &&
                        smooth->size(0) == x2d.size(1)),
            name, " needs smooth [K] in x's dtype or None");
  return {y, x2d.contiguous(), scales.contiguous(),
          smooth ? std::optional(smooth->contiguous()) : std::nullopt};
}

at::Tensor w8a8_vnni(const at::Tensor& x2d, const at::Tensor& weight_int8, const at::Tensor& scales,
                     const std::optional<at::Tensor>& smooth) {
  const auto [y, x, ws, sm] = w8a8_args("w8a8_vnni", x2d, weight_int8, scales, smooth);
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    linear(op::in<T>(x), op::in<T>(sm), op::in<int8_t>(weight_int8), op::in<T>(ws), op::out<T>(y),
           x.size(0), y.size(1), x.size(1), op::threads());
  });
  return y;
}

// w8a8_vnni's quantization and scaling around torch's int8 GEMM (oneDNN: packed, blocked, for
// many rows), in one call: the torch ops that int_mm() runs for them cost as much as the GEMM
// in an eager prefill.
at::Tensor w8a8_int_mm(const at::Tensor& x2d, const at::Tensor& weight_int8, const at::Tensor& scales,
                       const std::optional<at::Tensor>& smooth) {
  const auto [y, x, ws, sm] = w8a8_args("w8a8_int_mm", x2d, weight_int8, scales, smooth);
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), Kp = (K + 15) / 16 * 16;
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    const QuantRows& r = quantize(op::in<T>(x), op::in<T>(sm), M, K, Kp, Kp, op::threads());
    at::Tensor q = at::from_blob(const_cast<int8_t*>(r.q.data()), {M, Kp}, at::kChar);
    const at::Tensor acc = at::_int_mm(Kp == K ? q : q.narrow(1, 0, K).contiguous(), weight_int8.t());
    scale_rows(op::in<int32_t>(acc), r.scale.data(), op::in<T>(ws), op::out<T>(y), M, N, op::threads());
  });
  return y;
}

// w8a8_int_mm with oneDNN's GEMM on the weight packed once (torch.ops.onednn.qlinear_prepack, by
// the caller): _int_mm reorders the weight into that layout on every call. oneDNN's fast x86
// path takes unsigned activations, so q + 128 (the sign bit flipped) with zero point 128; its
// float32 output is the int32 products converted, as scale_rows converts them.
at::Tensor w8a8_onednn(const at::Tensor& x2d, const at::Tensor& packed, const at::Tensor& ones,
                       const at::Tensor& zeros, const at::Tensor& weight_int8,
                       const at::Tensor& scales, const std::optional<at::Tensor>& smooth) {
  static auto qlinear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("onednn::qlinear_pointwise", "")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                            std::optional<at::Tensor>, double, int64_t, std::optional<at::ScalarType>,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            c10::string_view)>();
  const auto [y, x, ws, sm] = w8a8_args("w8a8_onednn", x2d, weight_int8, scales, smooth);
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), Kp = (K + 15) / 16 * 16;
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    const QuantRows& r = quantize(op::in<T>(x), op::in<T>(sm), M, K, Kp, Kp, op::threads());
    at::Tensor u = at::empty({M, K}, x.options().dtype(at::kByte));
    uint8_t* ud = u.data_ptr<uint8_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) ud[m * K + k] = uint8_t(r.q[m * Kp + k]) ^ 0x80;
    const at::Tensor acc = qlinear.call(u, 1.0, 128, packed, ones, zeros, std::nullopt, 1.0, 0,
                                        at::kFloat, "none", c10::List<std::optional<at::Scalar>>(), "");
    scale_rows(op::in<float>(acc), r.scale.data(), op::in<T>(ws), op::out<T>(y), M, N, op::threads());
  });
  return y;
}

// The integer product alone, for tests: q [M, K] int8 (any values) @ weight_int8 [N, K]^T ->
// [M, N] int32, exact.
at::Tensor s8s8_vnni(const at::Tensor& q, const at::Tensor& weight_int8) {
  CHECK_ARG(q.scalar_type() == at::kChar && weight_int8.scalar_type() == at::kChar && q.dim() == 2 &&
                weight_int8.dim() == 2 && q.size(1) == weight_int8.size(1),
            "s8s8_vnni needs int8 q [M, K] and weight [N, K]");
  const at::Tensor qc = q.contiguous(), w = weight_int8.contiguous();
  const int64_t M = q.size(0), N = w.size(0), K = q.size(1), Kp = (K + KB - 1) / KB * KB;
  at::Tensor y = at::empty({M, N}, q.options().dtype(at::kInt));
  std::vector<int8_t> qp(M * Kp, 0);
  std::vector<int32_t> qsum(M, 0);
  const int8_t* qd = op::in<int8_t>(qc);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) qsum[m] += (qp[m * Kp + k] = qd[m * K + k]);
  mm<int32_t>(qp.data(), nullptr, qsum.data(), op::in<int8_t>(w), nullptr, op::out<int32_t>(y), M,
              N, K, Kp, op::threads());
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("w8a8_vnni(Tensor x2d, Tensor weight_int8, Tensor scales, Tensor? smooth) -> Tensor");
  m.def("s8s8_vnni(Tensor q, Tensor weight_int8) -> Tensor");
  m.def("w8a8_int_mm(Tensor x2d, Tensor weight_int8, Tensor scales, Tensor? smooth) -> Tensor");
  m.def(
      "w8a8_onednn(Tensor x2d, Tensor packed, Tensor ones, Tensor zeros, Tensor weight_int8, "
      "Tensor scales, Tensor? smooth) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) {
  m.impl("w8a8_vnni", w8a8_vnni);
  m.impl("s8s8_vnni", s8s8_vnni);
  m.impl("w8a8_int_mm", w8a8_int_mm);
  m.impl("w8a8_onednn", w8a8_onednn);
}
// The packed weight is an MKLDNN-layout tensor, so calls dispatch on that key.
TORCH_LIBRARY_IMPL(llm_recipes, MkldnnCPU, m) { m.impl("w8a8_onednn", w8a8_onednn); }
