"""Measured memory: bytes a built model actually holds and reads, for the memory model's tests
and the bench's weights column (common/parallel/memory.py computes the same from a config)."""

from __future__ import annotations

from torch import Tensor, nn


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
    unless an LM head shares the table, and but a multimodal model's encoders (they run on
    the prompt's images only)."""

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
    encoders = sum(
        weight_bytes(model.get_submodule(name)) for name in getattr(model, "encoder_modules", ())
    )
    return weight_bytes(model) - sum(embeddings.values()) - encoders
