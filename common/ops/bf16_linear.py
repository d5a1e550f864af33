"""Float linear, y = x @ wᵀ (+ bias), two ways:

- cpp_bf16dot: bf16dot.cpp, bf16 activations and weights on AVX512-BF16 (vdpbf16ps: exact
  products, fp32 sums, the bias added before the one rounding to bf16), one sequential
  weight stream per thread, each weight row loaded once for up to 8 activation rows, so
  batched decode reads the weights once per step; any K (masked tail).
  Elsewhere g++ refuses the source and the table skips it.
- torch: F.linear, every device and dtype (the fallback).
torch's bf16 matrix-vector product is far from the memory roofline on some CPUs and fine on
others, so the dispatch table measures which one runs, per rows bucket and weight size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op
from common.ops.working_set import weight_copies


def _check(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    (m, k), (n, k_w) = x2d.shape, weight.shape
    bf16 = torch.bfloat16
    if (
        x2d.dtype != bf16
        or weight.dtype != bf16
        or k != k_w
        or not weight.is_contiguous()
        or (bias is not None and (bias.dtype != bf16 or bias.shape != (n,)))
    ):
        raise ValueError(
            f"bf16_linear_cpp needs bfloat16 x [M, K], contiguous bfloat16 weight [N, K] and "
            f"bias [N] or None; got x {tuple(x2d.shape)} {x2d.dtype}, weight "
            f"{tuple(weight.shape)} {weight.dtype}, bias "
            f"{None if bias is None else (tuple(bias.shape), bias.dtype)}"
        )
    return torch.empty(m, n, dtype=bf16, device=x2d.device)


# x2d [M, K], weight [N, K] contiguous, bias [N] or None, all bfloat16 on cpu -> [M, N]
# bfloat16, on AVX512-BF16 (bf16dot.cpp).
bf16_linear_cpp = kernel_op("bf16dot", "bf16_linear_cpp", _check)


def torch_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x2d, weight, bias)


def _fits_cpp(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # The activation dtype is the table's key; the weight and bias must match it.
    same = weight.dtype == x2d.dtype and (bias is None or bias.dtype == x2d.dtype)
    return same and weight.is_contiguous()


bf16_linear = Op(
    "bf16_linear",
    [
        Impl(
            "cpp_bf16dot",
            bf16_linear_cpp,
            cpp="bf16dot",  # AVX512-BF16 only: elsewhere it does not build
            when=_fits_cpp,
            devices=("cpu",),
            dtypes=(torch.bfloat16,),
        ),
        Impl("torch", torch_linear),
    ],
    rows=lambda x2d, w, b: x2d.shape[0],
    size=lambda x2d, w, b: w.numel() * w.element_size(),  # weight bytes
    bench_args=weight_copies,
)
