"""Weight-only int8 linear, y = (x @ w_int8ᵀ) * scales, seven ways. Scales are per output
channel ([N], group_size 0) or per group of group_size input channels ([N, ceil(K / g)], g a
multiple of 32; the last group of a row may be partial):

- cpp_matvec: int8_matvec.cpp, one output channel at a time so each thread reads one
  sequential stream of weights; also runs fp32 activations, where int8pack_mm has only a
  scalar loop.
- cpp_bf16dot: int8_bf16dot.cpp, bf16 activations on AVX512-BF16 (vdpbf16ps on weights
  widened to bf16, exact products), one sequential weight stream per thread, each row loaded once for up to 8 activation
  rows, so batched decode reads the weights once per step instead of falling back to
  dequantize + GEMM.
- cpp_bf16outer: int8_bf16outer.cpp, the same on AVX512-BF16 as outer products: 16 weight
  rows transposed in registers into (16 channels x column pair) vectors, each multiplied by
  every activation row's broadcast column pair, so no output ends in a horizontal sum and the
  activations are read once per 16 channels (what bounds the dot form at 8-16 rows).
- int8pack_mm: torch._weight_int8pack_mm (AVX512/AMX matrix-vector; bf16 only, K % 16 == 0,
  per-channel scales only).
- dequant_mm: dequantize to the activation dtype + F.linear (gpt-fast's formulation, which
  torch.compile fuses).
- cpp_dequant_mm: the same with group-wise scales, the dequantize in one C++ pass
  (int8_matvec.cpp; torch's broadcast multiply of int8 by bf16 scales takes ~3x as long).
- npu: torch_npu.npu_weight_quant_batchmatmul (W8A16).
Every one computes with the same int8 values and scales; results differ in rounding and
summation order only. Which is fastest depends on the CPU, so the dispatch table measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op
from common.ops.working_set import weight_copies

_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels take


def _check(x2d: Tensor, weight_int8: Tensor, scales: Tensor, group_size: int = 0) -> Tensor:
    (m, k), (n, k_w) = x2d.shape, weight_int8.shape
    if (
        x2d.dtype not in _DTYPES
        or k != k_w
        or weight_int8.dtype != torch.int8
        or not weight_int8.is_contiguous()
        or scales.dtype != x2d.dtype
        or scales.shape != scale_shape(n, k, group_size)
    ):
        raise ValueError(
            f"int8_matvec_cpp needs x [M, K] float32/bfloat16 on cpu, contiguous int8 [N, K] "
            f"and scales [N] (group_size 0) or [N, ceil(K / g)] (g a multiple of 32) in x's "
            f"dtype; got x {tuple(x2d.shape)} {x2d.dtype}, weight {tuple(weight_int8.shape)} "
            f"{weight_int8.dtype}, scales {tuple(scales.shape)} {scales.dtype}, group_size "
            f"{group_size}"
        )
    return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)


def scale_shape(n: int, k: int, group_size: int) -> tuple[int, ...]:
    """The scales of an [N, K] int8 weight: one per output channel, or per group of inputs."""
    return (n,) if group_size == 0 else (n, -(-k // group_size))


# x2d [M, K] float32/bfloat16 on cpu, weight_int8 [N, K] contiguous, scales [N] or
# [N, ceil(K / g)] in x's dtype, group_size g (0: per channel) -> [M, N] in x's dtype:
# int8_matvec.cpp, and int8_bf16dot.cpp / int8_bf16outer.cpp for bfloat16 x on AVX512-BF16.
int8_matvec_cpp = kernel_op("int8_matvec", "int8_matvec_cpp", _check)
# weight_int8 [N, K], scales [N] or [N, ceil(K / g)] -> [N, K] in the scales' dtype.
int8_dequant_cpp = kernel_op(
    "int8_matvec",
    "int8_dequant_cpp",
    lambda w, scales, group_size=0: torch.empty(w.shape, dtype=scales.dtype, device=w.device),
)
int8_bf16dot_cpp = kernel_op("int8_bf16dot", "int8_bf16dot_cpp", _check)
int8_bf16outer_cpp = kernel_op("int8_bf16outer", "int8_bf16outer_cpp", _check)


def int8pack_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, group_size: int = 0) -> Tensor:
    # The AVX512 kernel segfaults unless x starts 32-byte aligned (a view like x[:, 8:] does not)
    # and on some row strides, so copy such inputs into a fresh, 64-byte-aligned buffer (and
    # always under torch.compile, whose fake tensors have no address).
    if torch.compiler.is_compiling() or not x2d.is_contiguous() or x2d.data_ptr() % 32:
        x2d = x2d.clone(memory_format=torch.contiguous_format)
    return torch._weight_int8pack_mm(x2d, weight_int8, scales)  # scales in x's dtype


def dequant_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, group_size: int = 0) -> Tensor:
    if group_size == 0:  # scaling the output saves an [N, K] multiply (gpt-fast's formulation)
        return F.linear(x2d, weight_int8.to(x2d.dtype)) * scales
    (n, k), groups = weight_int8.shape, scales.shape[1]
    w = F.pad(weight_int8.to(x2d.dtype), (0, groups * group_size - k))  # whole groups
    w = w.view(n, groups, group_size) * scales[..., None]  # one rounding per weight
    return F.linear(x2d, w.view(n, -1)[:, :k])


def cpp_dequant_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, group_size: int) -> Tensor:
    return F.linear(x2d, int8_dequant_cpp(weight_int8, scales, group_size))


def npu_mm(x2d: Tensor, weight_int8: Tensor, scales: Tensor, group_size: int = 0) -> Tensor:
    import torch_npu  # unverified: no NPU in CI

    # Group-wise scales go as [ceil(K / g), N]; antiquant_group_size 0 is per channel.
    scale = scales.t() if group_size else scales
    return torch_npu.npu_weight_quant_batchmatmul(
        x2d, weight_int8.t(), antiquant_scale=scale, antiquant_group_size=group_size
    )


int8_linear = Op(
    "int8_linear",
    [
        Impl(
            "cpp_matvec",
            int8_matvec_cpp,
            devices=("cpu",),
            dtypes=_DTYPES,
            cpp="int8_matvec",
        ),
        Impl(
            "cpp_bf16dot",
            int8_bf16dot_cpp,
            devices=("cpu",),
            dtypes=(torch.bfloat16,),
            cpp="int8_bf16dot",  # AVX512-BF16 only: elsewhere it does not build
        ),
        Impl(
            "cpp_bf16outer",
            int8_bf16outer_cpp,
            devices=("cpu",),
            dtypes=(torch.bfloat16,),
            cpp="int8_bf16outer",  # AVX512-BF16 only, as cpp_bf16dot
        ),
        Impl(
            "int8pack_mm",
            int8pack_mm,
            devices=("cpu",),
            dtypes=(torch.bfloat16,),  # other dtypes hit a scalar loop
            # reads 16 at a time, no tail; one scale per output channel
            when=lambda x2d, w, s, group_size=0: w.shape[1] % 16 == 0 and group_size == 0,
        ),
        Impl(
            "cpp_dequant_mm",
            cpp_dequant_mm,
            devices=("cpu",),
            dtypes=_DTYPES,
            cpp="int8_matvec",
            when=lambda x2d, w, s, group_size=0: group_size > 0,  # per channel: dequant_mm
        ),
        Impl("npu", npu_mm, devices=("npu",), dtypes=(torch.float16, torch.bfloat16)),
        Impl("dequant_mm", dequant_mm),
    ],
    rows=lambda x2d, w, *_: x2d.shape[0],
    size=lambda x2d, w, *_: w.numel(),  # int8 weight bytes
    bench_args=weight_copies,
)
