// int8 weight-only matrix-vector product for CPU decode (common/ops/int8_linear.py).
#include <vector>

#include "convert.h"
#include "torch_op.h"

namespace {
// y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k], accumulated in fp32
// (one group, the whole row, for per-channel scales). Threads split the output channels in
// contiguous ranges, so each reads one sequential stream of weights (the hardware
// prefetcher's best case); a weight row is read from memory once for all m.
template <class T>
void matvec(const T* x, const int8_t* w, const T* scale, T* y, int64_t M, int64_t N, int64_t K,
            int64_t group, int nthreads) {
  const int64_t groups = (K + group - 1) / group;
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f32(x[i]);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf.data() + m * K;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t end = std::min(K, (g + 1) * group);
        float part = 0.f;
        for (int64_t k = g * group; k < end; ++k) part += xm[k] * float(wn[k]);
        acc += part * to_f32(scale[n * groups + g]);
      }
      store(acc, y + m * N + n);
    }
  }
}

// out[n, k] = w[n, k] * scale[n, k / group], rounded once to T.
template <class T>
void dequant(const int8_t* w, const T* scale, T* out, int64_t N, int64_t K, int64_t group,
             int nthreads) {
  const int64_t groups = (K + group - 1) / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const float s = to_f32(scale[n * groups + g]);
      const int64_t end = std::min(K, (g + 1) * group);
      for (int64_t k = g * group; k < end; ++k) store(float(w[n * K + k]) * s, out + n * K + k);
    }
}
}  // namespace

// weight_int8 [N, K] contiguous, scales [N] or [N, ceil(K / g)] float32/bfloat16 -> [N, K] in
// the scales' dtype, in one pass (torch's int8 x bf16 broadcast multiply takes several).
at::Tensor int8_dequant_cpp(const at::Tensor& weight_int8, const at::Tensor& scales,
                            int64_t group_size) {
  CHECK_ARG(weight_int8.dim() == 2 && weight_int8.scalar_type() == at::kChar &&
                weight_int8.is_contiguous() && op::float_or_bf16(scales),
            "int8_dequant_cpp needs a contiguous int8 weight [N, K] and float32/bfloat16 scales, "
            "got ", weight_int8.sizes(), " ", weight_int8.scalar_type(), " and ",
            scales.scalar_type());
  const int64_t group =
      op::scale_group("int8_dequant_cpp", scales, weight_int8, scales, group_size);
  const at::Tensor s = scales.contiguous();
  at::Tensor out = at::empty(weight_int8.sizes(), s.options());
  op::by_dtype(s, [&](auto t) {
    using T = decltype(t);
    dequant(op::in<int8_t>(weight_int8), op::in<T>(s), op::out<T>(out), out.size(0), out.size(1),
            group, op::threads());
  });
  return out;
}

// x2d [M, K] float32/bfloat16, weight_int8 [N, K] contiguous, scales [N] or [N, ceil(K / g)]
// (group_size g) in x's dtype -> [M, N].
at::Tensor int8_matvec_cpp(const at::Tensor& x2d, const at::Tensor& weight_int8,
                           const at::Tensor& scales, int64_t group_size) {
  at::Tensor y = op::linear_out("int8_matvec_cpp", x2d, weight_int8, at::kChar, nullptr);
  const int64_t group = op::scale_group("int8_matvec_cpp", x2d, weight_int8, scales, group_size);
  const at::Tensor x = x2d.contiguous(), s = scales.contiguous();
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    matvec(op::in<T>(x), op::in<int8_t>(weight_int8), op::in<T>(s), op::out<T>(y), x.size(0),
           y.size(1), x.size(1), group, op::threads());
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("int8_matvec_cpp(Tensor x2d, Tensor weight_int8, Tensor scales, int group_size=0) -> Tensor");
  m.def("int8_dequant_cpp(Tensor weight_int8, Tensor scales, int group_size=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) {
  m.impl("int8_matvec_cpp", int8_matvec_cpp);
  m.impl("int8_dequant_cpp", int8_dequant_cpp);
}
