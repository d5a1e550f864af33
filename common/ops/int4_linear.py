"""Group-wise asymmetric int4 weight-only linear, y = x @ Wᵀ with
W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n], three ways:

- int4pack_mm: torch._weight_int4pack_mm_for_cpu (AVX512/AVX2 tinygemm, bf16 activations).
- dequant_mm: unpack and dequantize to the activation dtype + F.linear (the exact reference).
- npu: torch_npu.npu_weight_quant_batchmatmul with antiquant_group_size (W4A16).

All three read one stored layout, the one torch's CPU kernel reads (`pack`): uint8 [N, K/2],
two 4-bit values per byte, rows in blocks of BLOCK_N (64 with AVX512, 32 otherwise). Inside a
full block a byte holds row i (low nibble) and row i + BLOCK_N/2 (high nibble) of one column;
a partial last block (16, 32 or 48 rows) pairs rows 2i and 2i+1. `unpack_rows` inverts it in
plain tensor ops (tests check it against torch's packing on the machine they run on), so the
reference and checkpoints never depend on the kernel. scales_and_zeros is [K/g, N, 2] in the
activation dtype, torch's layout. Which implementation is fastest depends on the CPU, so the
dispatch table measures.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op

GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU kernel accepts
ROW_ALIGN = 16  # rows are packed in pairs inside blocks of 16, 32, 48 or BLOCK_N


@functools.cache
@torch.compiler.assume_constant_result  # traced as its value (dynamo looks through the cache)
def block_rows() -> tuple[int, bool]:
    """(BLOCK_N, whether a full block uses the split-lane layout) for torch's CPU kernel."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return 64, True
    return 32, capability == "AVX2"


def pack(q: Tensor) -> Tensor:
    """q [N, K] integers 0..15 (N % 16 == 0, K even) -> the stored uint8 [N, K/2] layout."""
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).cpu().contiguous(), 1)


def unpack_rows(packed: Tensor, rows: Tensor, k: int) -> Tensor:
    """The 4-bit values (uint8 0..15) of the given rows of a packed [N, K/2] weight -> [R, K]."""
    n = packed.shape[0]
    bn, split = block_rows()
    block = rows // bn
    size = torch.clamp(n - block * bn, max=bn)  # rows in each row's block
    i = rows - block * bn
    lanes = split & (size == bn)
    half = size // 2
    col = torch.where(lanes, i % half, i // 2)
    high = torch.where(lanes, i >= half, i % 2 == 1)
    base = block * bn * (k // 2) + col  # byte of column 0; column c adds c * size / 2
    cols = torch.arange(k, device=packed.device)
    flat = packed.reshape(-1)[base[:, None] + cols[None, :] * half[:, None]]
    return torch.where(high[:, None], flat >> 4, flat & 15)


def dequantize_rows(
    packed: Tensor, scales_and_zeros: Tensor, group_size: int, rows: Tensor, dtype: torch.dtype
) -> Tensor:
    """Rows of W = (q - 8) * scale + zero, computed in float32 and rounded once to dtype."""
    k = packed.shape[1] * 2
    q = unpack_rows(packed, rows, k).float().view(len(rows), k // group_size, group_size)
    sz = scales_and_zeros[:, rows].float().transpose(0, 1)  # [R, K/g, 2]
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(len(rows), k).to(dtype)


_CHUNK = 4096  # rows dequantized at a time: index temporaries stay a few MB


def dequantize(packed: Tensor, scales_and_zeros: Tensor, group_size: int, dtype: torch.dtype):
    n = packed.shape[0]
    rows = torch.arange(n, device=packed.device)
    return torch.cat(
        [
            dequantize_rows(packed, scales_and_zeros, group_size, rows[i : i + _CHUNK], dtype)
            for i in range(0, n, _CHUNK)
        ]
    )


def int4pack_mm(x2d: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), packed, group_size, scales_and_zeros)


def dequant_mm(x2d: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return F.linear(x2d, dequantize(packed, scales_and_zeros, group_size, x2d.dtype))


def npu_mm(x2d: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """W4A16 on Ascend: weight [K, N] int4 values (signed, q - 8) packed 8 per int32 by
    npu_convert_weight_to_int4pack; W = (w + offset) * scale with offset = zero / scale.
    Unverified (no NPU in CI); the weight is repacked per call, a load-time layout would not."""
    import torch_npu  # unverified: no NPU in CI

    n, k = packed.shape[0], packed.shape[1] * 2
    rows = torch.arange(n, device=packed.device)
    signed = unpack_rows(packed, rows, k).to(torch.int32) - 8
    weight = torch_npu.npu_convert_weight_to_int4pack(signed.t().contiguous())
    scale, zero = scales_and_zeros[..., 0], scales_and_zeros[..., 1]  # [K/g, N]
    return torch_npu.npu_weight_quant_batchmatmul(
        x2d,
        weight,
        antiquant_scale=scale,
        antiquant_offset=zero / scale,
        antiquant_group_size=group_size,
    )


int4_linear = Op(
    "int4_linear",
    [
        Impl(
            "int4pack_mm",
            int4pack_mm,
            devices=("cpu",),
            dtypes=(torch.bfloat16,),  # the vectorized tinygemm path
            when=lambda x2d, w, sz, g: g in GROUP_SIZES,
        ),
        Impl("npu", npu_mm, devices=("npu",), dtypes=(torch.float16, torch.bfloat16)),
        Impl("dequant_mm", dequant_mm),
    ],
    rows=lambda x2d, w, sz, g: x2d.shape[0],
    size=lambda x2d, w, sz, g: w.numel(),  # packed weight bytes
)
