"""One memory model: bytes of weights and KV per token for a model, dtype and quantization.

Everything that sizes memory (the bench's KV and roofline columns, KV capacity, the GQA
table, and later the planner) asks this module, so the arithmetic exists once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.kv.quant import SCALE_DTYPE


def kv_bytes_per_token(
    num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool
) -> int:
    """K + V bytes one token occupies across all layers (int8: data plus one scale per head)."""
    per_head = head_dim + SCALE_DTYPE.itemsize if int8 else head_dim * dtype.itemsize
    return 2 * num_layers * kv_heads * per_head


def model_kv_bytes_per_token(model: nn.Module, dtype: torch.dtype, int8: bool = False) -> int:
    a = model.args
    return kv_bytes_per_token(
        a.num_hidden_layers, a.num_key_value_heads, a.kv_head_dim, dtype, int8
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers; a tensor shared by several modules counts once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + [
            buf
            for name, buf in module._buffers.items()
            if name not in module._non_persistent_buffers_set
        ]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def is_lookup_table(module: nn.Module) -> bool:
    """Modules whose forward reads one row per token (embeddings, float or quantized)."""
    return isinstance(module, nn.Embedding) or getattr(module, "lookup_table", False)


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes read per decode step: everything but embedding tables (one row is read),
    unless an LM head shares the table."""

    def own(m: nn.Module) -> list[Tensor]:
        return [*m.parameters(recurse=False), *m.buffers(recurse=False)]

    read = {id(t) for m in model.modules() if not is_lookup_table(m) for t in own(m)}
    embeddings = {
        id(t): t.nbytes
        for m in model.modules()
        if is_lookup_table(m)
        for t in own(m)
        if id(t) not in read
    }
    return weight_bytes(model) - sum(embeddings.values())
