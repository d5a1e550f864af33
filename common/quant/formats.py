"""How each weight scheme stores a matrix: the one place its bytes are defined.

The memory model (common/parallel/memory.py) and the planner size weights from these formats;
each QuantScheme returns its own from `weight_format()`, and tests compare the bytes with
the tensors a quantized model holds. Formats of schemes not yet registered here (int4,
w8a8) describe the layouts their kernels take, so plans can be made before they run:

- int8 (common/quant/int8.py): int8 [N, K] + one scale per output row in the model dtype;
  embedding tables quantized the same way per row.
- int4: asymmetric, one scale and one zero per group of `group_size` input channels, both in
  the model dtype (the bf16 scales-and-zeros tensor of torch._weight_int4pack_mm and of
  npu_weight_quant_batchmatmul's antiquant scale/offset); embeddings stay float.
- w8a8 (SmoothQuant): int8 weights with an fp32 scale per output row; activations are
  quantized per token on the fly (the smoothing factors fold into the preceding norm);
  embeddings and the LM head stay float, as SmoothQuant deployments keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
W8A8 = WeightFormat("w8a8", bits=8, scale_bytes=4, head=False)
INT4_GROUP_SIZES = (32, 64, 128)


def int4(group_size: int = 128) -> WeightFormat:
    if group_size not in INT4_GROUP_SIZES:
        raise RecipeError(
            f"int4 group size {group_size}; choose one of {', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    return WeightFormat("int4", bits=4, group_size=group_size, zero_point=True)


SCHEME_NAMES = ("none", "int8", "int4", "w8a8")


def weight_format(name: str, group_size: int = 128) -> WeightFormat:
    """The format of a weight scheme by its quant.weights name (group_size: int4 only)."""
    formats = {"none": FLOAT, "bf16": FLOAT, "int8": INT8, "w8a8": W8A8}
    if name == "int4":
        return int4(group_size)
    if name not in formats:
        raise RecipeError(
            f"unknown weight scheme {name!r}; choose one of {', '.join(SCHEME_NAMES)}"
        )
    return formats[name]
