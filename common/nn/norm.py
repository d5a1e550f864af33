"""RMSNorm: the transformers formulation; which kernel computes it is the op registry's business."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.ops.cpu_kernels import KERNEL_DTYPES, cpu_kernels_available, rms_norm_cpp


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        on_cpu_kernel = x.is_cpu and x.dtype in KERNEL_DTYPES and x.dtype == self.weight.dtype
        if on_cpu_kernel and cpu_kernels_available():
            return rms_norm_cpp(x, self.weight, self.eps)  # the math below in one call
        if x.device.type == "npu":
            return _npu_rms_norm(x, self.weight, self.eps)
        # fp32 statistics, cast back before the scale: the transformers formulation.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _npu_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    import torch_npu  # unverified: no NPU in CI

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]
