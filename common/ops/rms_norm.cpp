// RMSNorm in one pass over each row, alone or after the residual add (common/ops/rms_norm.py).
#include <cmath>

#include "convert.h"

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

extern "C" void rms_norm_f32(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                             float eps, int nt) {
  rms_norm((const float*)x, (const float*)w, (float*)y, rows, dim, eps, nt);
}
extern "C" void rms_norm_bf16(const void* x, const void* w, void* y, int64_t rows, int64_t dim,
                              float eps, int nt) {
  rms_norm((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, rows, dim, eps, nt);
}
extern "C" void add_rms_norm_f32(const void* x, const void* r, const void* w, void* y, void* h,
                                 int64_t rows, int64_t dim, float eps, int nt) {
  add_rms_norm((const float*)x, (const float*)r, (const float*)w, (float*)y, (float*)h, rows, dim,
               eps, nt);
}
extern "C" void add_rms_norm_bf16(const void* x, const void* r, const void* w, void* y, void* h,
                                  int64_t rows, int64_t dim, float eps, int nt) {
  add_rms_norm((const uint16_t*)x, (const uint16_t*)r, (const uint16_t*)w, (uint16_t*)y,
               (uint16_t*)h, rows, dim, eps, nt);
}
