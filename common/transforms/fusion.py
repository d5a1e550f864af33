"""Projection fusion: stack projections that read the same input into one matmul."""

from __future__ import annotations

from torch import nn

from common.nn.attention import SelfAttention
from common.nn.mlp import GatedMLP


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
