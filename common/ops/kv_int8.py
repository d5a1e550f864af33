"""The int8 KV format: symmetric quantization with one scale per (token, head) vector.

x ≈ q * scale with q = round(x / scale) in [-127, 127] and scale = absmax(x) / 127 over the
last (head_dim) axis. Per-token scales need no calibration and follow each token's range,
so a new token never forces old ones to be requantized.

Scales are float16 whatever the model dtype: 2 bytes per vector (K/V cost D + 2 bytes
instead of 2D in bf16: 0.52x at D=64, 0.51x at D=128), the same layout for fp32 and bf16
models, and 11 mantissa bits (bf16 has 8). The scale is rounded *up* to float16 before the
values are quantized with it, so no value clamps and |x - q * scale| <= scale / 2 holds
exactly for the stored scale. Limits of float16: |x| up to ~8e6; vectors with absmax
below ~8e-3 get a subnormal (coarser) scale, which only matters in absolute terms < 1e-7.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16
_QMAX = 127


class QuantizedKV(NamedTuple):
    """int8 K or V with one float16 scale per (token, head) vector: the one int8 KV type,
    stored by KV storage and read by the attention kernels (which dequantize inside)."""

    data: Tensor  # int8 [..., D]
    scale: Tensor  # float16 [..., 1]


def quantize_kv(x: Tensor) -> QuantizedKV:
    """x [..., D] float -> (int8 [..., D], float16 scale [..., 1])."""
    xf = x.float()
    exact = xf.abs().amax(dim=-1, keepdim=True) / _QMAX
    scale = exact.to(SCALE_DTYPE)
    scale = torch.where(
        scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale
    ).clamp(max=torch.finfo(SCALE_DTYPE).max)
    s = scale.float()
    q = (xf / torch.where(s == 0, 1.0, s)).round().clamp(-_QMAX, _QMAX).to(torch.int8)
    return QuantizedKV(q, scale)


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_kv, computed in float32 and rounded once to dtype."""
    return (q.float() * scale.float()).to(dtype)
