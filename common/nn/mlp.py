"""Feed-forward blocks: SwiGLU with separate or stacked gate/up projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fused(self) -> FusedGatedMLP:
        """The same MLP with gate and up stacked in one gate_up_proj (one matmul)."""
        hidden, intermediate = self.gate_proj.in_features, self.gate_proj.out_features
        with torch.device("meta"):  # its own linears are replaced: allocate nothing for them
            mlp = FusedGatedMLP(hidden, intermediate, bias=self.gate_proj.bias is not None)
        mlp.gate_up_proj = stack_linears(self.gate_proj, self.up_proj)
        mlp.down_proj = self.down_proj
        return mlp


class FusedGatedMLP(nn.Module):
    """SwiGLU with gate and up stacked in one matrix, HF names gate_up_proj / down_proj
    (GLM-4, Phi-3): one matmul reads x once; the output's first half is the gate."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def stack_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear computing the given ones (same input) as consecutive output channels."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused
