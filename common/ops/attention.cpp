// Decode/prefill attention over paged pools or dense caches, read in place through strides
// (common/ops/attention.py).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "convert.h"
#include "torch_op.h"

static inline float to_f32(int8_t x) { return float(x); }  // beside the shared overloads

namespace {
float f16_to_f32(uint16_t h) {  // kv scales; never negative, inf or nan
  const int e = (h >> 10) & 31, m = h & 1023;
  return e ? std::ldexp(float(m | 1024), e - 25) : std::ldexp(float(m), -24);
}
constexpr int64_t QTILE = 16;  // queries of one row handled together (prefill)
constexpr int64_t TASKS_PER_THREAD = 4;  // decode: few (long runs read whole tokens), enough to balance rows

// e^x for x <= 0 (softmax weights once the max is subtracted) to about 1 ulp, in plain
// arithmetic so that a loop of it vectorizes (std::exp does not without -ffast-math).
// Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r a degree-6 polynomial, 2^n built in the
// exponent bits. Below -87 (and for -inf, an empty running max) it returns ~1e-38, not 0.
inline float exp_le0(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}

// One task = (row, run of kv heads, tile of queries): every query head of a group and every
// query of the tile share each K/V load, and the run's heads of one token are read together
// (adjacent in a [block, token, head, d] pool). Runs are as long as the parallelism allows.
// Online softmax in fp32; invisible keys are skipped.
// K/V element (block, token, head, d) is at block * st[0] + token * st[1] + head * st[2] + d,
// its scale at block * st[3] + token * st[4] + head * st[5]: pools and dense caches alike.
template <class T, class KV>
void attend(const T* q, const KV* kp, const KV* vp, const uint16_t* ks, const uint16_t* vs,
            const int32_t* bt, const int64_t* qpos, const int64_t* slen, T* out, int64_t B,
            int64_t H, int64_t Hkv, int64_t Tq, int64_t D, int64_t bs, int64_t mb,
            const int64_t* st, int nthreads) {
  const int64_t rep = H / Hkv, tiles = (Tq + QTILE - 1) / QTILE;
  // Decode reads each K/V element once per query head of its group: memory-bound, so a task
  // takes as long a run of adjacent heads as the parallelism allows. Prefill reuses each load
  // for a tile of queries: compute-bound, one head per task.
  const int64_t chunks =
      Tq > 1 ? Hkv : std::clamp((TASKS_PER_THREAD * nthreads + B - 1) / B, int64_t{1}, Hkv);
  const int64_t run = (Hkv + chunks - 1) / chunks, runs = (Hkv + run - 1) / run;
  const float scale = 1.f / std::sqrt(float(D));
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> kf(run * bs * D), vf(run * bs * D), qf(run * rep * QTILE * D),
        acc(run * rep * QTILE * D), mx(run * rep * QTILE), sum(run * rep * QTILE), s(bs);
    std::vector<int64_t> lim(run * rep * QTILE);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < B * runs * tiles; ++task) {
      const int64_t b = task / (runs * tiles), g0 = task / tiles % runs * run, t0 = task % tiles * QTILE;
      const int64_t ng = std::min(run, Hkv - g0), nt = std::min(QTILE, Tq - t0), nq = rep * nt;
      int64_t last = -1;
      for (int64_t j = 0; j < ng * nq; ++j) {  // j = (head of the run, query head, query)
        const int64_t h = g0 * rep + j / nt, t = t0 + j % nt;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_f32(q[((b * H + h) * Tq + t) * D + d]) * scale;
        lim[j] = std::min(qpos[b * Tq + t], slen[b] - 1);  // last visible key position
        last = std::max(last, lim[j]);
        mx[j] = -std::numeric_limits<float>::infinity(), sum[j] = 0.f;
        std::fill(&acc[j * D], &acc[(j + 1) * D], 0.f);
      }
      for (int64_t blk = 0; blk * bs <= last; ++blk) {
        const int64_t n = std::min(bs, last + 1 - blk * bs), blk_id = bt[b * mb + blk];
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t g = 0; g < ng; ++g) {
            const int64_t row = blk_id * st[0] + i * st[1] + (g0 + g) * st[2];
            const int64_t srow = blk_id * st[3] + i * st[4] + (g0 + g) * st[5];
            const float kscale = ks ? f16_to_f32(ks[srow]) : 1.f, vscale = vs ? f16_to_f32(vs[srow]) : 1.f;
            float *kd = &kf[(g * bs + i) * D], *vd = &vf[(g * bs + i) * D];
            for (int64_t d = 0; d < D; ++d) {
              kd[d] = to_f32(kp[row + d]) * kscale;
              vd[d] = to_f32(vp[row + d]) * vscale;
            }
          }
        }
        for (int64_t j = 0; j < ng * nq; ++j) {
          const int64_t nv = std::min(n, lim[j] - blk * bs + 1);
          if (nv <= 0) continue;
          const float *qj = &qf[j * D], *kg = &kf[j / nq * bs * D];
          float m = mx[j];
          for (int64_t i = 0; i < nv; ++i) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qj[d] * kg[i * D + d];
            s[i] = dot, m = std::max(m, dot);
          }
          // The block's weights in one vectorized pass; the running sums rescale once.
          float block_sum = 0.f;
          for (int64_t i = 0; i < nv; ++i) s[i] = exp_le0(s[i] - m), block_sum += s[i];
          const float corr = exp_le0(mx[j] - m);
          sum[j] = sum[j] * corr + block_sum, mx[j] = m;
          float* a = &acc[j * D];
          const float* vg = &vf[j / nq * bs * D];
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          for (int64_t i = 0; i < nv; ++i)
            for (int64_t d = 0; d < D; ++d) a[d] += s[i] * vg[i * D + d];
        }
      }
      for (int64_t j = 0; j < ng * nq; ++j) {
        const int64_t h = g0 * rep + j / nt, t = t0 + j % nt;
        const float inv = sum[j] > 0.f ? 1.f / sum[j] : 0.f;
        for (int64_t d = 0; d < D; ++d) store(acc[j * D + d] * inv, out + ((b * H + h) * Tq + t) * D + d);
      }
    }
  }
}
}  // namespace

// q [B, H, Tq, D] float32/bfloat16; k, v in q's dtype, or int8 with float16 scales k_scale,
// v_scale; element (block, token, head, d) of each at the strides of its dims token_dims =
// (block, token, head) and unit stride over d; block_tables [B, max_blocks], q_pos [B, Tq],
// seq_lens [B]. The tables are trusted (callers check that reads stay inside k).
at::Tensor attention_cpp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& v_scale, const at::Tensor& block_tables,
                         const at::Tensor& q_pos, const at::Tensor& seq_lens, int64_t block_size,
                         at::IntArrayRef token_dims) {
  const bool quant = k_scale.has_value();
  CHECK_ARG(op::float_or_bf16(q) && q.dim() == 4, "the C++ attention kernel needs float32/bfloat16 q [B, H, Tq, D], got ",
            q.scalar_type(), " ", q.sizes());
  CHECK_ARG(k.scalar_type() == (quant ? at::kChar : q.scalar_type()) &&
                (!quant || (v_scale && k_scale->scalar_type() == at::kHalf)),
            "K/V dtype ", k.scalar_type(), " does not match q dtype ", q.scalar_type());
  CHECK_ARG(token_dims.size() == 3, "token_dims: the (block, token, head) dims, got ", token_dims);
  std::array<int64_t, 6> st{}, vst{};
  for (int i = 0; i < 3; ++i) {
    st[i] = k.stride(token_dims[i]), vst[i] = v.stride(token_dims[i]);
    st[3 + i] = quant ? k_scale->stride(token_dims[i]) : 0;
    vst[3 + i] = quant ? v_scale->stride(token_dims[i]) : 0;
  }
  CHECK_ARG(k.scalar_type() == v.scalar_type() && st == vst && (k.size(-1) <= 1 || k.stride(-1) == 1),
            "K and V must share dtype and strides, with unit stride over head_dim");
  const at::Tensor qc = q.contiguous(), bt = block_tables.to(at::kInt).contiguous();
  const at::Tensor pos = q_pos.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto run = [&](auto t, auto kv) {
    using T = decltype(t);
    using KV = decltype(kv);
    attend<T, KV>(op::in<T>(qc), op::in<KV>(k), op::in<KV>(v), op::in<uint16_t>(k_scale),
                  op::in<uint16_t>(v_scale), op::in<int32_t>(bt), op::in<int64_t>(pos),
                  op::in<int64_t>(lens), op::out<T>(out), q.size(0), q.size(1),
                  k.size(token_dims[2]), q.size(2), q.size(3), block_size, bt.size(1), st.data(),
                  op::threads());
  };
  op::by_dtype(q, [&](auto t) { quant ? run(t, int8_t{}) : run(t, t); });
  return out;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def(
      "attention_cpp(Tensor q, Tensor k, Tensor v, Tensor? k_scale, Tensor? v_scale, "
      "Tensor block_tables, Tensor q_pos, Tensor seq_lens, int block_size, int[] token_dims) "
      "-> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("attention_cpp", attention_cpp); }
