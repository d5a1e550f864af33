// RMSNorm in one pass over each row, alone or after the residual add (common/ops/rms_norm.py).
#include <algorithm>
#include <cmath>

#include "convert.h"
#include "torch_op.h"

namespace {
// The transformers formulation: fp32 statistics, normalize, round to T, then multiply by the
// weight in T (one more rounding), so outputs match it bit for bit up to the summation order.
template <class T>
void norm_row(const T* x, const T* w, T* y, int64_t dim, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < dim; ++i) ss += to_f32(x[i]) * to_f32(x[i]);
  const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) {
    T h;
    store(to_f32(x[i]) * inv, &h);
    store(to_f32(w[i]) * to_f32(h), y + i);
  }
}

template <class T>
void rms_norm(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) norm_row(x + r * dim, w, y + r * dim, dim, eps);
}

// h = x + residual, rounded to T as torch's add rounds it (written to h), then y = norm(h):
// the pre-norm residual stream's step in one pass, bit for bit the add followed by rms_norm.
template <class T>
void add_rms_norm(const T* x, const T* res, const T* w, T* y, T* h, int64_t rows, int64_t dim,
                  float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* rr = res + r * dim;
    T* hr = h + r * dim;
    for (int64_t i = 0; i < dim; ++i) store(to_f32(xr[i]) + to_f32(rr[i]), hr + i);
    norm_row(hr, w, y + r * dim, dim, eps);
  }
}
}  // namespace

namespace {
void check(const char* name, const at::Tensor& x, const at::Tensor& weight) {
  CHECK_ARG(op::float_or_bf16(x) && weight.scalar_type() == x.scalar_type() && x.dim() >= 1 &&
                weight.dim() == 1 && weight.size(0) == x.size(-1),
            name, ": x ", x.scalar_type(), " ", x.sizes(), ", weight ", weight.scalar_type(), " ",
            weight.sizes());
}
}  // namespace

// x [..., dim] float32/bfloat16, weight [dim] in x's dtype -> rms_norm(x), x's shape.
at::Tensor rms_norm_cpp(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check("rms_norm_cpp", x, weight);
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    rms_norm(op::in<T>(xc), op::in<T>(w), op::out<T>(y), rows, dim, float(eps), op::threads());
  });
  return y;
}

// (rms_norm(x + residual), x + residual), the sum rounded to x's dtype first.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpp(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  check("add_rms_norm_cpp", x, weight);
  CHECK_ARG(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
            "add_rms_norm: residual ", residual.scalar_type(), " ", residual.sizes(), ", x ",
            x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous(), r = residual.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options()), h = at::empty(x.sizes(), x.options());
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  op::by_dtype(x, [&](auto t) {
    using T = decltype(t);
    add_rms_norm(op::in<T>(xc), op::in<T>(r), op::in<T>(w), op::out<T>(y), op::out<T>(h), rows,
                 dim, float(eps), op::threads());
  });
  return {y, h};
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("rms_norm_cpp(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_cpp(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) {
  m.impl("rms_norm_cpp", rms_norm_cpp);
  m.impl("add_rms_norm_cpp", add_rms_norm_cpp);
}
