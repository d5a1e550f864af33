// bf16 linear on AVX512-BF16 (common/ops/bf16_linear.py), through the register-blocked
// kernel of dpbf16.h: exact products, fp32 sums, the bias added to the fp32 sum, then one
// rounding to bf16. Masked loads take any K.
#include "dpbf16.h"
#include "torch_op.h"

// x2d [M, K] bf16, weight [N, K] bf16 contiguous, bias [N] bf16 or None -> [M, N] bf16.
at::Tensor bf16_linear_cpp(const at::Tensor& x2d, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  at::Tensor y = op::linear_out("bf16_linear_cpp", x2d, weight, at::kBFloat16,
                                bias ? &*bias : nullptr);
  CHECK_ARG(x2d.scalar_type() == at::kBFloat16, "bf16_linear_cpp needs bfloat16 x, got ",
            x2d.scalar_type());
  const at::Tensor x = x2d.contiguous();
  const auto* xb = op::in<uint16_t>(x);
  const auto* wb = op::in<uint16_t>(weight);
  auto* yb = op::out<uint16_t>(y);
  const int64_t M = x.size(0), N = y.size(1), K = x.size(1);
  if (bias) {
    const at::Tensor bc = bias->contiguous();
    const uint16_t* b = op::in<uint16_t>(bc);
    const auto biased = [b](float sum, int64_t n) { return sum + to_f32(b[n]); };
    dpbf16::matmul<dpbf16::Bf16>(xb, wb, biased, yb, M, N, K, op::threads());
  } else {
    const auto plain = [](float sum, int64_t) { return sum; };
    dpbf16::matmul<dpbf16::Bf16>(xb, wb, plain, yb, M, N, K, op::threads());
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(llm_recipes, m) {
  m.def("bf16_linear_cpp(Tensor x2d, Tensor weight, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_recipes, CPU, m) { m.impl("bf16_linear_cpp", bf16_linear_cpp); }
