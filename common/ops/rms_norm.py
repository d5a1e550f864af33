"""RMSNorm, weight * x / rms(x) over the last dim in the transformers formulation, three ways:
a C++ kernel (rms_norm.cpp: one pass, ~4 us per call where the torch ops below take ~18 us
at decode sizes on the 2-core dev CPU), torch ops, and torch_npu's fused kernel.

`add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)`: the
pre-norm residual stream's step (the fuse opt), the same three ways. The sum is rounded to
x's dtype before the norm, as the separate add rounds it, so every implementation equals the
add followed by its own rms_norm bit for bit."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from common.ops.build import load_cpp
from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def _kernel(dtype: torch.dtype, add: bool = False) -> ctypes._CFuncPtr:
    fn = getattr(load_cpp("rms_norm"), f"{'add_' if add else ''}rms_norm_{_SUFFIX[dtype]}")
    pointers = 5 if add else 3
    fn.argtypes = (
        [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    )
    return fn


def _check(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dtype not in _SUFFIX or weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm_cpp: x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("rms_norm_cpp", _check)
def rms_norm_cpp(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The C++ kernel, for float32/bfloat16 x and weight of the same dtype on cpu."""
    y = _check(x, weight, eps)
    if not x.is_cpu:
        raise ValueError(f"rms_norm_cpp runs on cpu, got {x.device}")
    x = x.contiguous()
    dim = x.shape[-1]
    _kernel(x.dtype)(
        x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x.numel() // max(dim, 1),
        dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y


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
            dtypes=tuple(_SUFFIX),
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


@kernel_op("add_rms_norm_cpp", _check_add)
def add_rms_norm_cpp(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The C++ kernel: one pass per row writes the sum and its norm."""
    y, h = _check_add(x, residual, weight, eps)
    if not x.is_cpu:
        raise ValueError(f"add_rms_norm_cpp runs on cpu, got {x.device}")
    x, residual = x.contiguous(), residual.contiguous()
    dim = x.shape[-1]
    _kernel(x.dtype, True)(
        x.data_ptr(), residual.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(),
        h.data_ptr(), x.numel() // max(dim, 1), dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y, h


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
            dtypes=tuple(_SUFFIX),
            cpp="rms_norm",
            when=lambda x, residual, weight, eps: weight.dtype == x.dtype,
        ),
        Impl("npu", add_rms_norm_npu, devices=("npu",)),
        Impl("torch", add_rms_norm_torch),
    ],
    rows=lambda x, residual, weight, eps: x.numel() // max(x.shape[-1], 1),
    size=lambda x, residual, weight, eps: x.shape[-1] * x.element_size(),  # one row
)
