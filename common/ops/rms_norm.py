"""RMSNorm, weight * x / rms(x) over the last dim in the transformers formulation, three ways:
a C++ kernel (rms_norm.cpp: one pass, ~4 us per call where the torch ops below take ~18 us
at decode sizes on the 2-core dev CPU), torch ops, and torch_npu's fused kernel.

`add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)`: the
pre-norm residual stream's step (the fuse opt), the same three ways. The sum is rounded to
x's dtype before the norm, as the separate add rounds it, so every implementation equals the
add followed by its own rms_norm bit for bit."""

from __future__ import annotations

import torch
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op

_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels take


def _check(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm_cpp: x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# The C++ kernel (rms_norm.cpp), for float32/bfloat16 x and weight of the same dtype on cpu.
rms_norm_cpp = kernel_op("rms_norm", "rms_norm_cpp", _check)


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # fp32 statistics, cast back before the scale: the transformers formulation.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_npu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    import torch_npu  # unverified: no NPU in CI

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


rms_norm = Op(
    "rms_norm",
    [
        Impl(
            "cpp",
            rms_norm_cpp,
            devices=("cpu",),
            dtypes=_DTYPES,
            cpp="rms_norm",
            when=lambda x, weight, eps: weight.dtype == x.dtype,
        ),
        Impl("npu", rms_norm_npu, devices=("npu",)),
        Impl("torch", rms_norm_torch),
    ],
    rows=lambda x, weight, eps: x.numel() // max(x.shape[-1], 1),
    size=lambda x, weight, eps: x.shape[-1] * x.element_size(),  # one row
)


def _check_add(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"add_rms_norm: residual {residual.dtype} {tuple(residual.shape)}, x {x.dtype} {tuple(x.shape)}"
        )
    return _check(x, weight, eps), torch.empty(x.shape, dtype=x.dtype, device=x.device)


# The C++ kernel: one pass per row writes the sum and its norm.
add_rms_norm_cpp = kernel_op("rms_norm", "add_rms_norm_cpp", _check_add)


def add_rms_norm_torch(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    h = x + residual
    return rms_norm_torch(h, weight, eps), h


def add_rms_norm_npu(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    import torch_npu  # unverified: no NPU in CI

    y, _, h = torch_npu.npu_add_rms_norm(x, residual, weight, eps)  # (y, rstd, x1 + x2)
    return y, h


add_rms_norm = Op(
    "add_rms_norm",
    [
        Impl(
            "cpp",
            add_rms_norm_cpp,
            devices=("cpu",),
            dtypes=_DTYPES,
            cpp="rms_norm",
            when=lambda x, residual, weight, eps: weight.dtype == x.dtype,
        ),
        Impl("npu", add_rms_norm_npu, devices=("npu",)),
        Impl("torch", add_rms_norm_torch),
    ],
    rows=lambda x, residual, weight, eps: x.numel() // max(x.shape[-1], 1),
    size=lambda x, residual, weight, eps: x.shape[-1] * x.element_size(),  # one row
)
