// Decode/prefill attention over paged pools or dense caches, read in place through strides
// (common/ops/attention.py). bf16 decode at head sizes 32, 64 and 128 has a path of its own
// in AVX512 registers where the compiler targets AVX512 (decode_bf16).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <immintrin.h>

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

// Adjacent kv heads per decode task: as many as leave TASKS_PER_THREAD tasks per thread.
inline int64_t decode_run(int64_t B, int64_t Hkv, int nthreads) {
  const int64_t chunks = std::clamp((TASKS_PER_THREAD * nthreads + B - 1) / B, int64_t{1}, Hkv);
  return (Hkv + chunks - 1) / chunks;
}

// Online softmax over one block: scores s[0, n) become their weights e^(s - m) under the new
// running max m; returns the factor that rescales what mx and sum held before (they move on).
inline float softmax_block(float* s, int64_t n, float& mx, float& sum) {
  float m = mx, block_sum = 0.f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  for (int64_t i = 0; i < n; ++i) s[i] = exp_le0(s[i] - m), block_sum += s[i];  // vectorizes
  const float corr = exp_le0(mx - m);
  sum = sum * corr + block_sum, mx = m;
  return corr;
}

template <class T>
inline void store_row(const float* acc, float sum, T* out, int64_t D) {
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t d = 0; d < D; ++d) store(acc[d] * inv, out + d);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DECODE_BF16 1
// 16 bf16 values as fp32 (a bf16 is the top half of an fp32).
inline __m512 bf16x16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Decode (one query per row) over bf16 K/V, D = 16 * NV: attend()'s tasks and online softmax,
// but each K and V row is widened to fp32 in registers as it is used, where attend() first
// copies a block of every head of the run to fp32 buffers (4x the bytes it reads, through L2).
// Both passes over a block run in the pool's order (token, then head), one stretch of memory.
template <int NV>
void decode_bf16(const uint16_t* q, const uint16_t* kp, const uint16_t* vp, const int32_t* bt,
                 const int64_t* qpos, const int64_t* slen, uint16_t* out, int64_t B, int64_t H,
                 int64_t Hkv, int64_t bs, int64_t mb, const int64_t* st, int nthreads) {
  constexpr int64_t D = 16 * NV;
  const int64_t rep = H / Hkv;
  const int64_t run = decode_run(B, Hkv, nthreads), runs = (Hkv + run - 1) / run;
  const float scale = 1.f / std::sqrt(float(D));
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t heads = run * rep;  // query heads of a task, at most
    std::vector<float> qf(heads * D), acc(heads * D), mx(heads), sum(heads), s(heads * bs);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < B * runs; ++task) {
      const int64_t b = task / runs, g0 = task % runs * run, ng = std::min(run, Hkv - g0);
      const int64_t nq = ng * rep, last = std::min(qpos[b], slen[b] - 1);
      for (int64_t j = 0; j < nq; ++j) {  // j = (kv head of the run, query head of its group)
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_f32(q[(b * H + g0 * rep + j) * D + d]) * scale;
        mx[j] = -std::numeric_limits<float>::infinity(), sum[j] = 0.f;
        std::fill(&acc[j * D], &acc[(j + 1) * D], 0.f);
      }
      for (int64_t blk = 0; blk * bs <= last; ++blk) {
        const int64_t n = std::min(bs, last + 1 - blk * bs), base = bt[b * mb + blk] * st[0] + g0 * st[2];
        for (int64_t i = 0; i < n; ++i)  // scores
          for (int64_t g = 0; g < ng; ++g) {
            const uint16_t* krow = kp + base + i * st[1] + g * st[2];
            __m512 kv[NV];
            for (int c = 0; c < NV; ++c) kv[c] = bf16x16(krow + 16 * c);
            for (int64_t j = g * rep; j < (g + 1) * rep; ++j) {
              __m512 a = _mm512_mul_ps(_mm512_loadu_ps(&qf[j * D]), kv[0]);
              for (int c = 1; c < NV; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[j * D + 16 * c]), kv[c], a);
              s[j * bs + i] = _mm512_reduce_add_ps(a);
            }
          }
        for (int64_t j = 0; j < nq; ++j) {
          const float corr = softmax_block(&s[j * bs], n, mx[j], sum[j]);
          for (int64_t d = 0; d < D; ++d) acc[j * D + d] *= corr;
        }
        for (int64_t i = 0; i < n; ++i)  // weighted values
          for (int64_t g = 0; g < ng; ++g) {
            const uint16_t* vrow = vp + base + i * st[1] + g * st[2];
            __m512 vv[NV];
            for (int c = 0; c < NV; ++c) vv[c] = bf16x16(vrow + 16 * c);
            for (int64_t j = g * rep; j < (g + 1) * rep; ++j) {
              const __m512 w = _mm512_set1_ps(s[j * bs + i]);
              for (int c = 0; c < NV; ++c) {
                float* a = &acc[j * D + 16 * c];
                _mm512_storeu_ps(a, _mm512_fmadd_ps(w, vv[c], _mm512_loadu_ps(a)));
              }
            }
          }
      }
      for (int64_t j = 0; j < nq; ++j) store_row(&acc[j * D], sum[j], out + (b * H + g0 * rep + j) * D, D);
    }
  }
}
#endif

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
#ifdef DECODE_BF16
  if constexpr (std::is_same_v<T, uint16_t> && std::is_same_v<KV, uint16_t>) {
    if (Tq == 1) switch (D) {  // the usual head sizes; others take the loop below
#define DECODE(NV) \
  case 16 * NV: return decode_bf16<NV>(q, kp, vp, bt, qpos, slen, out, B, H, Hkv, bs, mb, st, nthreads);
        DECODE(2) DECODE(4) DECODE(8)
#undef DECODE
      }
  }
#endif
  const int64_t rep = H / Hkv, tiles = (Tq + QTILE - 1) / QTILE;
  // Decode reads each K/V element once per query head of its group: memory-bound, so a task
  // takes as long a run of adjacent heads as the parallelism allows. Prefill reuses each load
  // for a tile of queries: compute-bound, one head per task.
  const int64_t run = Tq > 1 ? 1 : decode_run(B, Hkv, nthreads), runs = (Hkv + run - 1) / run;
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
          for (int64_t i = 0; i < nv; ++i) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qj[d] * kg[i * D + d];
            s[i] = dot;
          }
          const float corr = softmax_block(s.data(), nv, mx[j], sum[j]);
          float* a = &acc[j * D];
          const float* vg = &vf[j / nq * bs * D];
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          for (int64_t i = 0; i < nv; ++i)
            for (int64_t d = 0; d < D; ++d) a[d] += s[i] * vg[i * D + d];
        }
      }
      for (int64_t j = 0; j < ng * nq; ++j) {
        const int64_t h = g0 * rep + j / nt, t = t0 + j % nt;
        store_row(&acc[j * D], sum[j], out + ((b * H + h) * Tq + t) * D, D);
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
