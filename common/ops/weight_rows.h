// The outer loop of the linear kernels (dpbf16.h, int8_vnni.cpp): output channels split among
// threads in contiguous ranges, one weight row at a time, so each thread reads its part of the
// weights as one sequential stream, the hardware prefetcher's best case (blocks of 8 rows read
// side by side read markedly slower at batch 1: docs/performance.md, `fast_linear`).
#pragma once
#include <cstdint>

// row(w_n, n) for every output channel n, w_n the weight row [K].
template <class T, class Row>
void for_each_weight_row(const T* w, int64_t N, int64_t K, int nthreads, const Row& row) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) row(w + n * K, n);
}
