// int8 weight-only linear for bf16 activations on AVX512-BF16 (common/ops/int8_linear.py),
// through the register-blocked kernel of dpbf16.h. Each weight is widened to bf16 (exact:
// |w| <= 128 fits bf16's 8-bit mantissa) and vdpbf16ps multiplies pairs in fp32 (bf16 x bf16
// products are exact in fp32): the same math as int8_matvec.cpp, in another summation order.
#include "dpbf16.h"
#include "torch_op.h"

namespace {
struct Int8 {
  using T = int8_t;
  static __m512bh load(const int8_t* w, __mmask32 m) {
    const __m256i b = _mm256_maskz_loadu_epi8(m, w);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);  // exact: small integers
  }
};
}  // namespace

// x2d [M, K] bf16, weight_int8 [N, K] contiguous, scales [N] or [N, ceil(K / g)] (group_size
// g) bf16 -> [M, N] bf16.
at::Tensor int8_bf16dot_cpp(const at::Tensor& x2d, const at::Tensor& weight_int8,
                            const at::Tensor& scales, int64_t group_size) {
  at::Tensor y = op::linear_out("int8_bf16dot_cpp", x2d, weight_int8, at::kChar, nullptr);
  const int64_t group = op::scale_group("int8_bf16dot_cpp", x2d, weight_int8, scales, group_size);
  CHECK_ARG(x2d.scalar_type() == at::kBFloat16, "int8_bf16dot_cpp needs bfloat16 x, got ",
            x2d.scalar_type());
  const at::Tensor x = x2d.contiguous(), s = scales.contiguous();
  const uint16_t* sp = op::in<uint16_t>(s);
  const uint16_t* xp = op::in<uint16_t>(x);
  const int8_t* wp = op::in<int8_t>(weight_int8);
  const int64_t M = x.size(0), N = y.size(1), K = x.size(1);
  const int64_t groups = s.dim() == 2 ? s.size(1) : 1;
  if (groups == 1) {  // one scale per row: applied once to the finished dot product
    const auto scaled = [sp](float sum, int64_t n) { return sum * to_f32(sp[n]); };
    dpbf16::matmul<Int8>(xp, wp, scaled, op::out<uint16_t>(y), M, N, K, op::threads());
  } else {  // one per group: each partial sum weighed by its group's scale
    const auto plain = [](float sum, int64_t) { return sum; };
    const auto scale = [sp, groups](int64_t n, int64_t g) { return to_f32(sp[n * groups + g]); };
    dpbf16::matmul<Int8>(xp, wp, plain, scale, group, op::out<uint16_t>(y), M, N, K,
                         op::threads());
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("int8_bf16dot_cpp(Tensor x2d, Tensor weight_int8, Tensor scales, int group_size=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("int8_bf16dot_cpp", int8_bf16dot_cpp); }
