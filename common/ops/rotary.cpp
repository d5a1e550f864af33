// Rotary position embedding on q and k in one call (common/ops/rotary.py).
#include "convert.h"

// torch computes x * cos and rotate(x) * sin as separate ops, each rounded to T, then their
// sum: kept so here (no fused multiply-add), so outputs equal torch's bit for bit.
#pragma GCC optimize("fp-contract=off")

namespace {
// One head row: channels [0, rot) rotated (the two halves, or adjacent pairs when
// interleaved), the rest copied.
template <class T>
void rotate_row(const T* x, T* y, const T* c, const T* s, int64_t dim, int64_t rot, bool inter) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < rot; ++i) {
    float r;
    if (inter) r = (i & 1) ? to_f32(x[i - 1]) : -to_f32(x[i + 1]);
    else r = i < half ? -to_f32(x[i + half]) : to_f32(x[i - half]);
    T a, b;
    store(to_f32(x[i]) * to_f32(c[i]), &a);
    store(r * to_f32(s[i]), &b);
    store(to_f32(a) + to_f32(b), y + i);
  }
  for (int64_t i = rot; i < dim; ++i) y[i] = x[i];
}

// x [B, H, T, D] with strides (sb, sh, st) and unit stride over D -> y contiguous [B, H, T, D];
// cos, sin contiguous [B, T, rot]. Rows of q (Hq heads) then k (Hk heads).
template <class T>
void rotary_qk(const T* q, const T* k, const T* c, const T* s, T* oq, T* ok, int64_t B,
               int64_t Hq, int64_t Hk, int64_t Tn, int64_t D, int64_t rot, int64_t qb,
               int64_t qh, int64_t qt, int64_t kb, int64_t kh, int64_t kt, bool inter,
               int nthreads) {
  const int64_t H = Hq + Hk, rows = B * H * Tn;
#pragma omp parallel for num_threads(nthreads) if (rows * D > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r % Tn, h = (r / Tn) % H, b = r / (Tn * H);
    const T* cr = c + (b * Tn + t) * rot;
    const T* sr = s + (b * Tn + t) * rot;
    if (h < Hq)
      rotate_row(q + b * qb + h * qh + t * qt, oq + ((b * Hq + h) * Tn + t) * D, cr, sr, D, rot,
                 inter);
    else
      rotate_row(k + b * kb + (h - Hq) * kh + t * kt, ok + ((b * Hk + h - Hq) * Tn + t) * D, cr,
                 sr, D, rot, inter);
  }
}
}  // namespace

#define ROTARY(name, T)                                                                        \
  extern "C" void name(const void* q, const void* k, const void* c, const void* s, void* oq,   \
                       void* ok, int64_t B, int64_t Hq, int64_t Hk, int64_t Tn, int64_t D,      \
                       int64_t rot, int64_t qb, int64_t qh, int64_t qt, int64_t kb, int64_t kh, \
                       int64_t kt, int inter, int nt) {                                         \
    rotary_qk((const T*)q, (const T*)k, (const T*)c, (const T*)s, (T*)oq, (T*)ok, B, Hq, Hk,   \
              Tn, D, rot, qb, qh, qt, kb, kh, kt, inter != 0, nt);                              \
  }
ROTARY(rotary_qk_f32, float)
ROTARY(rotary_qk_bf16, uint16_t)
