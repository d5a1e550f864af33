"""The fast_linear opt: the model's float linears run through the dispatched bf16_linear op
(common/ops/bf16_linear.py: a C++ AVX512-BF16 kernel where the measurement finds it faster
than torch, F.linear otherwise and for every other dtype)."""

from __future__ import annotations

from torch import Tensor, nn

from common import ops


class FastLinear(nn.Linear):
    """nn.Linear whose forward is ops.bf16_linear: the same parameters under the same names,
    so checkpoints, weight counts and tied tables are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        out = ops.bf16_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def route_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear a FastLinear, in place, LM head included. Run after fusion
    (stacked projections are plain nn.Linears too) and quantization (which swaps exactly
    nn.Linear, so only the linears it kept in float are left). The class changes in place
    rather than the module being rebuilt: FastLinear adds no state, and a module held under
    several names or a weight shared with an embedding stays shared as it was."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    return model
