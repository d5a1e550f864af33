// Rotary position embedding on q and k in one call (common/ops/rotary.py).
#include "convert.h"
#include "torch_op.h"

// torch computes x * cos and rotate(x) * sin as separate ops, each rounded to T, then their
// sum: kept so here (no fused multiply-add), so outputs equal torch's bit for bit.
#pragma GCC optimize("fp-contract=off")

namespace {
// y[i] = x[i] * c[i] + r * s[i], each product and the sum rounded to T (as torch's ops do).
template <class T>
inline void rotate1(const T* x, T* y, const T* c, const T* s, int64_t i, float r) {
  T a, b;
  store(to_f32(x[i]) * to_f32(c[i]), &a);
  store(r * to_f32(s[i]), &b);
  store(to_f32(a) + to_f32(b), y + i);
}

// One head row: channels [0, rot) rotated (the two halves, or adjacent pairs when
// interleaved), the rest copied; a loop per kind of channel, without branches, so each
// vectorizes.
template <class T>
void rotate_row(const T* x, T* y, const T* c, const T* s, int64_t dim, int64_t rot, bool inter) {
  const int64_t half = rot / 2;
  if (inter) {
    for (int64_t i = 0; i < rot; i += 2) {
      rotate1(x, y, c, s, i, -to_f32(x[i + 1]));
      rotate1(x, y, c, s, i + 1, to_f32(x[i]));
    }
  } else {
    for (int64_t i = 0; i < half; ++i) rotate1(x, y, c, s, i, -to_f32(x[i + half]));
    for (int64_t i = half; i < rot; ++i) rotate1(x, y, c, s, i, to_f32(x[i - half]));
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

// q [B, H, T, D] and k [B, Hkv, T, D] in any strides with unit stride over D (views of the
// projection's output), cos/sin [B, T, rot] -> contiguous rotated copies of q and k.
std::tuple<at::Tensor, at::Tensor> rotary_cpp(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              bool interleaved) {
  const bool same = k.scalar_type() == q.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                    sin.scalar_type() == q.scalar_type();
  const bool shapes = q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && k.size(0) == q.size(0) &&
                      k.size(2) == q.size(2) && k.size(3) == q.size(3) &&
                      cos.size(0) == q.size(0) && cos.size(1) == q.size(2) &&
                      sin.sizes() == cos.sizes() && cos.size(2) <= q.size(3) && cos.size(2) % 2 == 0;
  CHECK_ARG(op::float_or_bf16(q) && same && shapes, "rotary_cpp: q ", q.sizes(), " ",
            q.scalar_type(), ", k ", k.sizes(), " ", k.scalar_type(), ", cos/sin ", cos.sizes(),
            " ", cos.scalar_type());
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous(), kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor oq = at::empty(q.sizes(), q.options()), ok = at::empty(k.sizes(), k.options());
  op::by_dtype(q, [&](auto t) {
    using T = decltype(t);
    rotary_qk(op::in<T>(qc), op::in<T>(kc), op::in<T>(c), op::in<T>(s), op::out<T>(oq),
              op::out<T>(ok), q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), c.size(2),
              qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
              interleaved, op::threads());
  });
  return {oq, ok};
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("rotary_cpp(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("rotary_cpp", rotary_cpp); }
