"""int4 group-wise weights x int8 per-row (per-token) activations, llama.cpp's q4_0 x q8_0
product for the int4 scheme's weights. With W = (q - 8) * s + z per group of g input channels
(q in 0..15; common/quant/int4.py) and xq, sx = quantize_rows(x) (w8a8_linear.py):

    y[m, n] = sx[m] * Σ_g (s[n, g] Σ_{k∈g} q[n, k] xq[m, k] + (z - 8 s)[n, g] Σ_{k∈g} xq[m, k])

Two ways:
- vnni: int4_vnni.cpp, AVX512-VNNI vpdpbusd (q the unsigned operand as stored), activation
  quantization in the same call; one sequential weight stream per thread, each row loaded
  once for up to 8 rows. Built only where the CPU has VNNI.
- reference: the same integers in torch: each group's dot products in float32 (exact: every
  partial sum is an integer below 2^24), then the same scale math; runs anywhere.
They agree to float rounding (the order of the float sums differs).

Layout (`pack`): uint8 [N, ceil(K/64) * 32], rows in order; per chunk of 64 input channels of
a row 32 bytes, byte j = q[j] | q[j + 32] << 4 (K padded with 8: its activations are zero).
scales and zeros [N, ceil(K/g)] in the activation dtype, as the int4 scheme rounds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.dispatch import Impl, Op
from common.ops.library import kernel_op
from common.ops.w8a8_linear import quantize_rows
from common.ops.working_set import weight_copies

CHUNK = 64  # input channels per 32 packed bytes of a row
_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernel takes
_BLOCK = 1 << 22  # reference: float elements of one batch of per-group products [G', M, N]


def _chunks(k: int) -> int:
    return -(-k // CHUNK)


def pack(q: Tensor) -> Tensor:
    """q [N, K] integers 0..15 -> the stored uint8 [N, ceil(K/64) * 32]."""
    n, k = q.shape
    q = F.pad(q.to(torch.uint8), (0, _chunks(k) * CHUNK - k), value=8)
    halves = q.view(n, -1, 2, CHUNK // 2)  # [N, chunks, low/high, 32]
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, -1)


def unpack(packed: Tensor, k: int) -> Tensor:
    """The stored layout -> q [N, K] (uint8 0..15)."""
    n = packed.shape[0]
    halves = packed.reshape(n, -1, 1, CHUNK // 2)
    return torch.cat([halves & 15, halves >> 4], 2).reshape(n, -1)[:, :k]


def _check(x2d: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The output (empty), or ValueError naming what does not fit."""
    k = x2d.shape[-1]
    n = packed.shape[0]
    groups = -(-k // group_size) if group_size > 0 else -1
    if (
        x2d.dim() != 2
        or not x2d.is_floating_point()
        or not (group_size == 32 or (group_size > 0 and group_size % CHUNK == 0))
        or packed.dtype != torch.uint8
        or packed.shape != (n, _chunks(k) * CHUNK // 2)
        or any(t.shape != (n, groups) or t.dtype != x2d.dtype for t in (scales, zeros))
    ):
        raise ValueError(
            f"w4a8_linear needs x [M, K] float, a uint8 weight [N, ceil(K/64)*32], scales and "
            f"zeros [N, ceil(K/g)] in x's dtype and g 32 or a multiple of 64; got x "
            f"{tuple(x2d.shape)} {x2d.dtype}, weight {tuple(packed.shape)} {packed.dtype}, "
            f"scales {tuple(scales.shape)} {scales.dtype}, zeros {tuple(zeros.shape)} "
            f"{zeros.dtype}, g {group_size}"
        )
    return torch.empty(x2d.shape[0], n, dtype=x2d.dtype, device=x2d.device)


# x [M, K] f32/bf16 on cpu, contiguous packed [N, ceil(K/64)*32], scales and zeros [N, G] in
# x's dtype -> [M, N] in x's dtype (int4_vnni.cpp).
w4a8_vnni = kernel_op("int4_vnni", "w4a8_vnni", _check)


def reference(
    x2d: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    _check(x2d, packed, scales, zeros, group_size)
    (m, k), (n, groups) = x2d.shape, scales.shape
    xq, sx = quantize_rows(x2d)
    width = groups * group_size
    xg = F.pad(xq.float(), (0, width - k)).view(m, groups, group_size).transpose(0, 1)
    wg = F.pad(unpack(packed, k).float(), (0, width - k)).view(n, groups, group_size)
    wg = wg.permute(1, 2, 0)  # [G, g, N]
    s, z = scales.float().t(), zeros.float().t()  # [G, N]
    acc = xg.sum(-1).t() @ (z - 8 * s)  # the zero term: group sums of xq, exact integers
    step = max(1, _BLOCK // max(m * n, 1))  # groups per batch of products
    for g in range(0, groups, step):
        acc += (torch.bmm(xg[g : g + step], wg[g : g + step]) * s[g : g + step, None]).sum(0)
    return (acc * sx[:, None]).to(x2d.dtype)


w4a8_linear = Op(
    "w4a8_linear",
    [
        Impl("vnni", w4a8_vnni, devices=("cpu",), dtypes=_DTYPES, cpp="int4_vnni"),
        Impl("reference", reference),
    ],
    rows=lambda x2d, w, s, z, g: x2d.shape[0],
    size=lambda x2d, w, s, z, g: w.numel(),  # packed weight bytes
    bench_args=weight_copies,
)
