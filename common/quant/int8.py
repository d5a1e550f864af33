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
import torch.nn.functional as F
from torch import Tensor, nn

from common.ops.cpu_kernels import cpu_kernels_available, int8_matvec_cpp

_MIN_SCALE = 1e-8  # keeps all-zero rows from dividing by zero
# Rows up to which torch._weight_int8pack_mm beats dequantize + bf16 matmul on the 2-core
# AVX512 CI CPU (768-2048 wide layers: 0.3-0.8x the time at <= 8 rows, 1.5-4x at >= 16).
_INT8PACK_MAX_ROWS = 8
# Rows up to which the C++ matrix-vector kernel (common/cpu_kernels.py) wins, per activation
# dtype: bf16 decode at 1-2 rows (0.5x int8pack_mm's time on weights not in cache); fp32,
# which int8pack_mm runs in a scalar loop, up to where dequantize + GEMM takes over.
_MATVEC_MAX_ROWS = {torch.bfloat16: 2, torch.float32: 8}
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


def _mm_cpu_bf16(x2d: Tensor, weight_int8: Tensor, scales: Tensor) -> Tensor:
    # The AVX512 kernel segfaults unless x starts 32-byte aligned (a view like x[:, 8:] does not)
    # and on some row strides, so copy such inputs into a fresh, 64-byte-aligned buffer.
    if not x2d.is_contiguous() or x2d.data_ptr() % 32:
        x2d = x2d.clone(memory_format=torch.contiguous_format)
    return torch._weight_int8pack_mm(x2d, weight_int8, scales)  # scales in x's dtype


def _mm_npu(x2d: Tensor, weight_int8: Tensor, scales: Tensor) -> Tensor:
    import torch_npu

    # unverified: no NPU in CI
    return torch_npu.npu_weight_quant_batchmatmul(x2d, weight_int8.t(), antiquant_scale=scales)


def _mm_dequant(x2d: Tensor, weight_int8: Tensor, scales: Tensor) -> Tensor:
    # Scaling the output instead of the weight saves an [N, K] multiply (gpt-fast's formulation).
    return F.linear(x2d, weight_int8.to(x2d.dtype)) * scales


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
        rows, dtype = x2d.shape[0], x.dtype
        scales = self.scales if self.scales.dtype == dtype else self.scales.to(dtype)
        # Both CPU kernels are matrix-vector loops: past a few rows (prefill) dequantize +
        # GEMM wins. int8pack_mm is only vectorized for bf16 (fp32/fp16 hit a scalar loop)
        # and reads 16 elements per step with no tail, so other K values produce garbage.
        if x.is_cpu and rows <= _MATVEC_MAX_ROWS.get(dtype, 0) and cpu_kernels_available():
            out = int8_matvec_cpp(x2d, self.weight_int8, scales)
        elif (
            x.is_cpu
            and dtype == torch.bfloat16
            and rows <= _INT8PACK_MAX_ROWS
            and self.in_features % 16 == 0
        ):
            out = _mm_cpu_bf16(x2d, self.weight_int8, scales)
        elif x.device.type == "npu" and dtype in (torch.float16, torch.bfloat16):
            out = _mm_npu(x2d, self.weight_int8, scales)
        else:
            out = _mm_dequant(x2d, self.weight_int8, scales)
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
