"""RMSNorm: the transformers formulation; which kernel computes it is the op registry's business."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        # weight * (x / rms(x)) with fp32 statistics, cast back before the scale.
        return ops.rms_norm(x, self.weight, self.eps)
