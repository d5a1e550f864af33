"""Weight-only int8 quantization: per-output-channel symmetric int8 weights, float activations.

Decode (batch 1) is memory-bound, so halving the bytes read per token is the whole win; the
matmul itself still runs in the activation dtype. Embedding tables are quantized per row
(a row is a tied LM head's output channel, so a tied pair shares one int8 table): decode
reads one row of them, but they are a large share of a small model's bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn

from common import ops

_MIN_SCALE = 1e-8  # keeps all-zero rows from dividing by zero
_QUANT_ROWS = 1024  # rows quantized at a time


def _quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> ([N, K] int8, [N] scales in the weight's dtype)."""
    floor = max(_MIN_SCALE, torch.finfo(weight.dtype).tiny)  # fp16 cannot hold 1e-8
    n = weight.shape[0]
    weight_int8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=weight.dtype, device=weight.device)
    for i in range(0, n, _QUANT_ROWS):  # blocks of rows keep the fp32 temporaries small
        w = weight[i : i + _QUANT_ROWS].detach().to(torch.float32, copy=True)  # divided in place
        # Scales are stored in the weight dtype (the CPU kernel reads them as the activation
        # dtype), so quantize against the rounded scale: that keeps |w - q * scale| <= scale / 2
        # for the stored value.
        s = (w.abs().amax(dim=1) / 127).clamp(min=floor).to(weight.dtype)
        scales[i : i + _QUANT_ROWS] = s
        weight_int8[i : i + _QUANT_ROWS] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return weight_int8, scales


class Int8WeightOnlyLinear(nn.Module):
    """Drop-in for nn.Linear holding int8 weights [N, K] and per-output-channel scales [N]."""

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized: tuple[Tensor, Tensor] | None = None):
        weight_int8, scales = quantized or _quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_int8, scales, bias)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        dtype = x.dtype
        scales = self.scales if self.scales.dtype == dtype else self.scales.to(dtype)
        out = ops.int8_linear(x2d, self.weight_int8, scales)  # the dispatch table picks the kernel
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Drop-in for nn.Embedding holding int8 rows [V, H] and one scale per row [V]."""

    lookup_table = True  # forward reads one row per token (the memory model counts it so)

    def __init__(self, weight_int8: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, quantized: tuple[Tensor, Tensor] | None = None
    ):
        return cls(*(quantized or _quantize_per_channel(embedding.weight)))

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_int8[ids].to(self.scales.dtype) * self.scales[ids, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


_INT8_MODULES = {
    nn.Linear: Int8WeightOnlyLinear.from_linear,
    nn.Embedding: Int8Embedding.from_embedding,
}


def quantize_int8(
    model: nn.Module, skip: Callable[[str, nn.Module], bool] | None = None
) -> nn.Module:
    """Replace every nn.Linear and nn.Embedding (unless skip(name, module)) with its int8
    version, in place. A weight shared by several modules (a tied LM head) is quantized once
    and its int8 table shared, so it still counts once."""
    # remove_duplicate=False: a module registered under two names must be replaced at both.
    names: dict[int, tuple[nn.Module, list[str]]] = {}  # id(module) -> (module, its names)
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in _INT8_MODULES and not (skip is not None and skip(name, module)):
            names.setdefault(id(module), (module, []))[1].append(name)
    # Modules are converted one at a time and dropped from `names`, so each float weight is
    # freed once its last user is replaced: the peak holds one float matrix beyond the int8
    # model, not the whole float model. A weight shared by modules is quantized once.
    users = Counter(id(module.weight) for module, _ in names.values())
    tables: dict[int, tuple[Tensor, Tensor]] = {}  # id(float weight) -> (int8, scales)
    while names:
        _, (module, module_names) = names.popitem()
        key = id(module.weight)
        table = tables.pop(key, None) or _quantize_per_channel(module.weight)
        users[key] -= 1
        if users[key]:
            tables[key] = table
        new = _INT8_MODULES[type(module)](module, table)
        del module
        for name in module_names:
            if not name:  # the model itself is the module: nothing to replace it in
                return new
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
    return model
