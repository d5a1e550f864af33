"""RMSNorm: the transformers formulation; which kernel computes it is the op registry's business."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common import ops


class RMSNorm(nn.Module):
    """`fused_add` (set by the fuse opt): `add` runs the residual add and the norm as one
    kernel (ops.add_rms_norm) instead of an add and ops.rms_norm."""

    fused_add = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        # weight * (x / rms(x)) with fp32 statistics, cast back before the scale.
        return ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """One step of a pre-norm residual stream: (norm(residual + x), residual + x); with
        no residual yet, x starts the stream. The sum is rounded to x's dtype before the norm
        either way, so fused and separate give the same bits (up to the norm's kernel)."""
        if residual is None:
            return self(x), x
        if self.fused_add:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        h = residual + x
        return self(h), h
