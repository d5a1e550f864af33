// int8 weight-only matrix-vector product for CPU decode (common/ops/int8_linear.py).
#include <vector>

#include "convert.h"

namespace {
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], accumulated in fp32. Threads split the output
// channels in contiguous ranges, so each reads one sequential stream of weights (the hardware
// prefetcher's best case); a weight row is read from memory once for all m.
template <class T>
void matvec(const T* x, const int8_t* w, const T* scale, T* y, int64_t M, int64_t N, int64_t K,
            int nthreads) {
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f32(x[i]);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wn = w + n * K;
    const float s = to_f32(scale[n]);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf.data() + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * float(wn[k]);
      store(acc * s, y + m * N + n);
    }
  }
}
}  // namespace

extern "C" void matvec_f32(const void* x, const int8_t* w, const void* s, void* y, int64_t M,
                           int64_t N, int64_t K, int nt) {
  matvec((const float*)x, w, (const float*)s, (float*)y, M, N, K, nt);
}
extern "C" void matvec_bf16(const void* x, const int8_t* w, const void* s, void* y, int64_t M,
                            int64_t N, int64_t K, int nt) {
  matvec((const uint16_t*)x, w, (const uint16_t*)s, (uint16_t*)y, M, N, K, nt);
}
