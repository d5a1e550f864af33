// RMSNorm in one pass over each row (common/ops/rms_norm.py).
#include <cmath>

#include "convert.h"

namespace {
// The transformers formulation: fp32 statistics, normalize, round to T, then multiply by the
// weight in T (one more rounding), so outputs match it bit for bit up to the summation order.
template <class T>
void rms_norm(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += to_f32(xr[i]) * to_f32(xr[i]);
    const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      T h;
      store(to_f32(xr[i]) * inv, &h);
      store(to_f32(w[i]) * to_f32(h), y + r * dim + i);
    }
  }
}
}  // namespace

extern "C" void rms_norm_f32(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                             float eps, int nt) {
  rms_norm((const float*)x, (const float*)w, (float*)y, rows, dim, eps, nt);
}
extern "C" void rms_norm_bf16(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                              float eps, int nt) {
  rms_norm((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, rows, dim, eps, nt);
}
