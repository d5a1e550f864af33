"""AWQ (Lin et al. 2023): scale up the input channels that carry large activations before
rounding, so their weights lose less to int4, and fold the inverse scale into what produces
those inputs (an RMSNorm weight, or the rows of the previous linear), which keeps the float
model's outputs exactly.

Per group of linears reading one input: s = mean|x|^alpha (normalized), alpha searched on a
grid in [0, 1) for the least output error of the int4-rounded linears on the calibration
inputs. alpha = 0 is s = 1, plain round to nearest, so the search never does worse than it
on those inputs. Then each group's range is narrowed at either end where that lowers the
output error (AWQ's auto-clip: a narrower grid rounds the bulk of the group finer), except
for q and k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.quant.int4 import clip_groups, fake_rtn, pad_groups

MAX_TOKENS = 2048  # calibration rows the search evaluates (a seeded subset)


@torch.no_grad()
def search_scales(x: Tensor, weights: list[Tensor], group_size: int, grid: int = 20) -> Tensor:
    """x [T, K] inputs of linears with weights [N_i, K] -> per-input-channel scales [K]
    (float32) minimizing Σ_i mean((x / s) Q(W_i * s)ᵀ - x W_iᵀ)²."""
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] > MAX_TOKENS:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_TOKENS]
        x = x[idx.to(x.device)]
    mean_abs = x.abs().mean(0)
    refs = [x @ w.float().t() for w in weights]
    best, best_s = float("inf"), torch.ones_like(mean_abs)
    for step in range(grid):
        s = mean_abs.pow(step / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(
            float(((x / s) @ fake_rtn(w.float() * s, group_size).t() - ref).pow(2).mean())
            for w, ref in zip(weights, refs)
        )
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(x: Tensor, weight: Tensor, group_size: int) -> Tensor:
    """AWQ's clipping search on inputs x [T, K]: weight [N, K] clamped per group where that
    lowers the output error of its int4 rounding (common/quant/int4.py clip_groups)."""
    cols = weight.shape[1]
    weight = pad_groups(weight, group_size)  # a last partial group: padded as int4 stores it
    x = F.pad(x.reshape(-1, cols).float(), (0, weight.shape[1] - cols))  # zeros: no error
    xg = x.view(x.shape[0], -1, group_size)
    hessian = torch.einsum("tgi,tgj->gij", xg, xg) / x.shape[0]  # [G, g, g]
    return clip_groups(weight, hessian, group_size)[:, :cols]
