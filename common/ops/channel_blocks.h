// The outer loop of the register-blocked linear kernels (dpbf16.h, int8_vnni.cpp): output
// channels in blocks of NB weight rows, split among threads in contiguous ranges so each
// thread streams its part of the weights once.
#pragma once
#include <cstdint>

// block(rows, n0, nb) for every block: rows, the NB weight rows [K] from output channel n0;
// the last block has only nb real ones (the rest re-read row n0, their outputs unstored).
template <int NB, class T, class Block>
void for_channel_blocks(const T* w, int64_t N, int64_t K, int nthreads, const Block& block) {
  const int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * NB;
    const int nb = int(N - n0 < NB ? N - n0 : NB);
    const T* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + (j < nb ? j : 0)) * K;
    block(rows, n0, nb);
  }
}
