"""How each weight scheme stores a matrix: the one place its bytes are defined.

The memory model (common/parallel/memory.py) and the planner size weights from these formats;
each QuantScheme returns its own from `weight_format()`, and tests compare the bytes with
the tensors a quantized model holds; int4 and w8a8 are also checked against the tensors
their kernels take:

- int8 (common/quant/int8.py): int8 [N, K] + one scale per output row, or per group of
  `group_size` input channels, in the model dtype; embedding tables quantized the same way.
- int4: asymmetric, one scale and one zero per group of `group_size` input channels, both in
  the model dtype (the scales-and-zeros tensor of torch._weight_int4pack_mm and the antiquant
  scale/offset of npu_weight_quant_batchmatmul); embedding tables quantized the same way
  (rows padded to the kernel's alignment are not counted).
- w8a8 (SmoothQuant): the int8 layout (weights and a scale per output row in the model dtype,
  embeddings weight-only int8); activations are quantized per token on the fly. Explicit
  smoothing vectors ([K] where a linear's input is not a norm's output) are not counted.
- w4a8: int4's layout and bytes (the same q, scales and zeros; rows padded to 64 input
  channels rather than to the group, not counted); activations are quantized per token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.core.errors import RecipeError


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int | None = None  # bits per element; None = the model dtype (no quantization)
    group_size: int | None = None  # input channels per scale; None = one scale per row
    zero_point: bool = False  # a zero per group besides the scale (asymmetric)
    scale_bytes: int | None = None  # None = the model dtype's element size
    embeddings: bool = False  # embedding tables stored in this format too
    head: bool = True  # an untied LM head stored in this format
    dequantizes: bool = False  # prefill dequantizes each weight to the model dtype first

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def matrix_bytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        """A [rows (output channels), cols (input channels)] weight."""
        if self.bits is None:
            return rows * cols * dtype.itemsize
        groups = -(-cols // self.group_size) if self.group_size else 1
        scale = self.scale_bytes or dtype.itemsize
        return -(-rows * cols * self.bits // 8) + rows * groups * scale * (1 + self.zero_point)

    def label(self) -> str:
        return f"{self.name} g{self.group_size}" if self.group_size else self.name


FLOAT = WeightFormat("none")
INT8 = WeightFormat("int8", bits=8, embeddings=True, dequantizes=True)
W8A8 = WeightFormat("w8a8", bits=8, embeddings=True)
GROUP_SIZES = (32, 64, 128)  # quant.group_size: input channels per scale (int4 and int8)
DEFAULT_INT4_GROUP = 128  # int4 and its relatives when quant.group_size is null


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise RecipeError(
            f"quant.group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}"
        )


def int4(group_size: int = DEFAULT_INT4_GROUP) -> WeightFormat:
    check_group_size(group_size)
    return WeightFormat("int4", bits=4, group_size=group_size, zero_point=True, embeddings=True)


def w4a8(group_size: int = 128) -> WeightFormat:
    return replace(int4(group_size), name="w4a8")


SCHEME_NAMES = ("none", "int8", "int4", "w8a8", "w4a8")


def weight_format(name: str, group_size: int = 128) -> WeightFormat:
    """The format of a weight scheme by its quant.weights name (group_size: int4, w4a8)."""
    grouped = {"int4": int4, "w4a8": w4a8}
    if name in grouped:
        return grouped[name](group_size)
    formats = {"none": FLOAT, "bf16": FLOAT, "int8": INT8, "w8a8": W8A8}
    if name not in formats:
        raise RecipeError(
            f"unknown weight scheme {name!r}; choose one of {', '.join(SCHEME_NAMES)}"
        )
    return formats[name]
