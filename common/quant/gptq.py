"""GPTQ (Frantar et al. 2022): round a weight column by column and push each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
squared output error, H = 2/n Σ x xᵀ over calibration inputs x.

The formulation follows the reference implementation: dampen H (a fraction of its mean
diagonal), take the upper Cholesky factor of H⁻¹, and update in column blocks (lazy batch
updates) so the big rank-k updates are matmuls. With act_order, columns are visited in order
of decreasing H diagonal (the most active inputs first), and group params are computed up
front on the natural column order ("static groups") so the kernel's contiguous groups hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.quant.int4 import clip_groups, group_params, pad_groups

_BLOCK = 128  # columns per lazy update; a multiple of every group size


class Hessian:
    """Running H = 2/n Σ x xᵀ (float32) over the rows fed to add()."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.h = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).addmm_(x.t(), x, alpha=2 / total)
        self.n = total


def gptq(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    act_order: bool = False,
    damp: float = 0.01,
    clip: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """weight [N, K], hessian [K, K] -> (q, scales, zeros). bits=4: q [N, K] uint8 0..15
    with asymmetric (scales, zeros) [N, ceil(K/g)] (W ≈ (q - 8) * scale + zero); bits=8:
    q [N, K] int8 with symmetric per-output-channel scales [N] and zeros None. Params are
    rounded to weight.dtype, as stored. clip (int4): each group's grid spans a clipped range,
    searched for the least output error under the group's block of the Hessian."""
    n, k = weight.shape
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs never active: any value, set them to zero
    h[dead, dead] = 1
    w[:, dead] = 0
    scales, zeros = _params(w, bits, group_size, weight.dtype, h if clip else None)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(n, k, dtype=torch.int16, device=w.device)
    for i1 in range(0, k, _BLOCK):
        i2 = min(i1 + _BLOCK, k)
        w1, err1, hinv1 = (
            w[:, i1:i2].clone(),
            torch.empty(n, i2 - i1, device=w.device),
            hinv[i1:i2, i1:i2],
        )
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if bits == 4 and not act_order and col % group_size == 0:  # groups as they come
                end = min(i + group_size, i2 - i1)
                wg = pad_groups(w1[:, i:end], group_size)
                if clip:
                    wg = clip_groups(wg, _block(h, i1 + i, group_size)[None], group_size)
                s, z = group_params(wg, group_size, weight.dtype)
                scales[:, col // group_size], zeros[:, col // group_size] = s[:, 0], z[:, 0]
            qi, deq = _round(w1[:, i], bits, scales, zeros, col, group_size)
            q[:, i1 + i] = qi
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return (q.to(torch.uint8), scales, zeros) if bits == 4 else (q.to(torch.int8), scales, None)


def _block(h: Tensor, start: int, size: int) -> Tensor:
    """h[start:start+size, start:start+size], zero-padded to [size, size] past h's end."""
    b = h[start : start + size, start : start + size]
    return F.pad(b, (0, size - b.shape[1], 0, size - b.shape[0]))


def _params(w: Tensor, bits: int, group_size: int, dtype: torch.dtype, h: Tensor | None):
    """Initial params: per group (int4; act_order keeps these, static groups; clipped when
    given the Hessian h) or per row (int8)."""
    if bits == 8:
        return (w.abs().amax(1) / 127).clamp(min=1e-8).to(dtype), None
    padded = pad_groups(w, group_size)
    if h is not None:
        starts = range(0, padded.shape[1], group_size)
        blocks = torch.stack([_block(h, j, group_size) for j in starts])
        padded = clip_groups(padded, blocks, group_size)
    return group_params(padded, group_size, dtype)


def _round(
    col: Tensor, bits: int, scales: Tensor, zeros: Tensor | None, index: int, group_size: int
) -> tuple[Tensor, Tensor]:
    """One column's integers and their dequantized values."""
    if bits == 8:
        s = scales.float()
        q = (col / s).round().clamp(-127, 127)
        return q, q * s
    s, z = scales[:, index // group_size].float(), zeros[:, index // group_size].float()
    q = ((col - z) / s + 8).round().clamp(0, 15)
    return q, (q - 8) * s + z
