"""Fusion (the fuse opt): fewer, larger kernel calls per decode step, same outputs.

- projections: stack the projections that read the same input into one matmul (q/k/v,
  gate/up); the int8 opt turns this on too.
- add_norm: the residual add and the following RMSNorm in one kernel (ops.add_rms_norm).
- rotary: q and k rotated in one kernel call (ops.rotary).
"""

from __future__ import annotations

from torch import nn

from common.nn.attention import SelfAttention
from common.nn.mlp import GatedMLP
from common.nn.norm import RMSNorm
from common.nn.rotary import RotaryEmbedding


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack the projections that read the same input, in place: q/k/v of every SelfAttention,
    gate/up of every GatedMLP. Outputs are unchanged; run it after loading (names change)."""
    for module in list(model.modules()):
        if isinstance(module, SelfAttention):
            module.fuse_qkv()
        for name, child in module.named_children():
            if isinstance(child, GatedMLP):
                setattr(module, name, child.fused())
    return model


def fuse_kernels(model: nn.Module, add_norm: bool, rotary: bool) -> nn.Module:
    """Route every RMSNorm's residual add (add_norm) and every rotary embedding's q/k pair
    (rotary) through their one-call kernels, in place. Rotary modules held outside the module
    tree (each attention keeps its shared table in a list) are the model's own, so visiting
    the tree finds them all."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused_add = add_norm
        elif isinstance(module, RotaryEmbedding):
            module.fused = rotary
    return model
