"""W4A8: the int4 scheme's group-wise weights with per-token dynamic int8 activations, int4 x
int8 products accumulated in int32 (llama.cpp's q4_0, whose matmuls take q8_0 activations).

The weights are rounded exactly as `int4` rounds them (same q, scales and zeros; only the
layout differs, common/ops/w4a8_linear.py), so w4a8 differs from int4 by the activations'
rounding alone: each row to 255 levels of its own max|x|, as w8a8 rounds it. No smoothing,
as q4_0 x q8_0 has none; but one scale per token lets an outlier channel coarsen its whole
row (what w8a8's smoothing is for), where q8_0 scales each block of 32 activations.

Embeddings and a LM head tied to them stay weight-only int4 (one shared table, as the int4
scheme has it): the head's input feeds the logits directly and a lookup has no matmul to speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import ops
from common.core.errors import RecipeError
from common.ops.int4_linear import unpack_rows
from common.ops.w4a8_linear import pack, unpack
from common.quant.formats import WeightFormat
from common.quant.formats import w4a8 as w4a8_format
from common.quant.int4 import (
    Int4Linear,
    Int4WeightOnly,
    int4_state_dict,
    load_int4_state_dict,
    pack_nibbles,
    quantize_int4,
    rtn,
)
from common.quant.int8 import _replace
from common.quant.w8a8 import _embedding_weights, _swap

Table = tuple[Tensor, Tensor, Tensor]  # (q [N, K] 0..15, scales, zeros [N, ceil(K/g)])


class W4A8Linear(nn.Module):
    """Drop-in for nn.Linear: a packed int4 weight (ops/w4a8_linear.py's layout) with per-group
    scales and zeros [N, ceil(K/g)], named as the checkpoint names them; activations quantized
    per row in the kernel."""

    def __init__(self, table: Table, group_size: int, bias: Tensor | None = None) -> None:
        super().__init__()
        q, scales, zeros = table
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("weight_packed", pack(q).to(scales.device))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, table: Table, group_size: int) -> W4A8Linear:
        return cls(table, group_size, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_int4(cls, m: Int4Linear) -> W4A8Linear:
        """The same q, scales and zeros as an Int4Linear (no rounding)."""
        n, k = m.out_features, m.in_features
        q = unpack_rows(m.weight_packed, torch.arange(n), m.weight_packed.shape[1] * 2)[:, :k]
        sz = m.scales_and_zeros[:, :n].transpose(0, 1)  # [N, G, 2]
        table = (q, sz[..., 0].contiguous(), sz[..., 1].contiguous())
        return cls(table, m.group_size, m.bias)

    def q(self) -> Tensor:
        """The 4-bit values [N, K] (uint8 0..15)."""
        return unpack(self.weight_packed, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        scales, zeros = self.scales, self.zeros
        if scales.dtype != x.dtype:
            scales, zeros = scales.to(x.dtype), zeros.to(x.dtype)
        out = ops.w4a8_linear(x2d, self.weight_packed, scales, zeros, self.group_size)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    extra_repr = Int4Linear.extra_repr  # the same attributes


class W4A8(Int4WeightOnly):
    """The w4a8 scheme (a common.quant.scheme.QuantScheme). Checkpoints hold the int4 scheme's
    tensors (NAME.qweight, NAME.scales, NAME.zeros; the same values for the same model);
    quantization_config names the scheme and its int8 per-token activations."""

    name = "w4a8"
    kernels = ("w4a8_linear",)  # the tied head runs int4_linear, embeddings dequantize rows

    def weight_format(self) -> WeightFormat:
        return w4a8_format(self.group_size)

    def quantization_config(self) -> dict[str, object]:
        return {
            **super().quantization_config(),
            "activations": {"bits": 8, "dynamic": True, "granularity": "per_token"},
        }

    @torch.no_grad()
    def quantize(
        self,
        model: nn.Module,
        calibration: object = None,
        skip: Callable[[str, nn.Module], bool] | None = None,
    ) -> nn.Module:
        """Every linear (but those skip(name, module) keeps in float) to W4A8Linear, in place;
        embeddings and a head tied to them to int4, weight-only."""
        tied = _embedding_weights(model)

        def weight_only(name: str, m: nn.Module) -> bool:  # the int4 pass takes tied heads
            return id(m.weight) in tied or (skip is not None and skip(name, m))

        g = self.group_size
        make = {nn.Linear: lambda linear, table: W4A8Linear.from_linear(linear, table, g)}
        model = _replace(model, weight_only, lambda names, weight: rtn(weight, g), make)
        return quantize_int4(model, g, skip)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """int4's tensors: W4A8Linear's scales and zeros are already under their checkpoint
        names; its qweight is written here, its K padded to whole groups with 8 as int4's is."""
        out = int4_state_dict(model)
        for name, m in model.named_modules():
            if isinstance(m, W4A8Linear):
                width = out[f"{name}.scales"].shape[1] * m.group_size
                out[f"{name}.qweight"] = pack_nibbles(
                    F.pad(m.q(), (0, width - m.in_features), value=8)
                )
        return out

    @torch.no_grad()
    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, Any]
    ) -> nn.Module:
        """Load as int4 (a float model of the same architecture, on meta or not), then make
        the linears that w4a8 quantizes activations for W4A8Linear."""
        if config.get("scheme") != self.name:
            raise RecipeError(f"checkpoint quantization {config!r} is not the {self.name} scheme")
        tied = _embedding_weights(model)
        names = {
            n
            for n, m in model.named_modules(remove_duplicate=False)
            if type(m) is nn.Linear and id(m.weight) not in tied
        }
        model = load_int4_state_dict(model, state, int(config["group_size"]))
        make = {
            m: W4A8Linear.from_int4(m)
            for n, m in model.named_modules()
            if n in names and type(m) is Int4Linear
        }
        _swap(model, make)
        return model
