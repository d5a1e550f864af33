"""Vision transformer layers for images of any size (NaViT-style, Qwen2-VL's vision tower).

Images are not padded to one size: every image becomes its own run of patches in one flat
sequence [N, dim], and attention stays inside a segment (an image, a video frame, or a
window of one) given by cumulative boundaries (`cu_seqlens`, as flash-attn's varlen API).
Segments of equal length are batched into one SDPA call each, so the block-diagonal
attention costs the sum of the segments' squares, not the square of the whole sequence (a
masked SDPA over all N tokens would compute and discard every cross-segment block).
Parameter names follow transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.nn.rotary import AxialRotaryEmbedding
from common.ops.rotary import rotate_half

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# -- layout of patches: positions, segments, windows (computed from each image's grid)


def grid_positions(grid_thw: list[list[int]], merge: int) -> Tensor:
    """(row, column) of every patch [N, 2], patches ordered block-major over merge x merge
    blocks (the order the merger concatenates), frames repeating the same positions."""
    out = []
    for t, h, w in grid_thw:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_bounds(grid_thw: list[list[int]]) -> list[int]:
    """Cumulative segment boundaries, one segment per image frame (h * w patches)."""
    bounds = [0]
    for t, h, w in grid_thw:
        bounds += [bounds[-1] + h * w * (i + 1) for i in range(t)]
    return bounds


def window_order(grid_thw: list[list[int]], merge: int, window: int) -> tuple[Tensor, list[int]]:
    """Windowed attention over `window` x `window` merged units: (the permutation of merged
    units that makes each window contiguous [N / merge^2], window boundaries in patches).
    Edge windows are smaller; windows never cross images."""
    order, bounds, offset = [], [0], 0
    unit = merge * merge
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = -gh % window, -gw % window
        padded = F.pad(index, (0, pw, 0, ph), value=-1)
        nh, nw = (gh + ph) // window, (gw + pw) // window
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, window * window)
        sizes = (padded >= 0).sum(-1).flatten()
        order.append(padded[padded >= 0] + offset)
        for n in sizes.tolist():
            if n:
                bounds.append(bounds[-1] + n * unit)
        offset += t * gh * gw
    return torch.cat(order), bounds


def segment_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int]) -> Tensor:
    """Bidirectional attention inside each segment [bounds[i], bounds[i+1]); q, k, v
    [N, heads, head_dim]. One SDPA call per distinct segment length."""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(bounds, bounds[1:]):
        by_len.setdefault(b - a, []).append(a)
    for length, starts in by_len.items():
        if len(starts) == 1 and length == q.shape[0]:
            idx = slice(None)
        else:
            idx = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(q.device)
        n = len(starts)
        q_, k_, v_ = (x[idx].view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q_, k_, v_)
        out[idx] = o.transpose(1, 2).reshape(n * length, *q.shape[1:])
    return out


# -- modules


class PatchEmbed3D(nn.Module):
    """Conv3d patchify (temporal x patch x patch, stride = kernel), HF name `proj`. The input
    is already cut into patches [N, C * T * P * P], so the conv is one matmul."""

    def __init__(self, patch: int, temporal: int, in_channels: int, dim: int) -> None:
        super().__init__()
        kernel = (temporal, patch, patch)
        self.proj = nn.Conv3d(in_channels, dim, kernel, stride=kernel, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class VisionAttention(nn.Module):
    """Multi-head self-attention with fused `qkv` and `proj` (HF names), axial rotary, and
    attention restricted to segments."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bounds: list[int]) -> Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)  # [N, heads, head_dim]
        # rotary in fp32 as transformers does: low-precision angles would move every patch
        cos, sin = cos[:, None].float(), sin[:, None].float()
        rot = rotate_half
        q = (q.float() * cos + rot(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rot(k.float()) * sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, bounds).reshape(n, -1))


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))), HF names fc1 / fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x)). HF names."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, heads)
        self.mlp = mlp

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bounds: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenate each merge x merge block of patches and project to the language model's
    width: ln_q, then mlp = Linear, GELU, Linear (HF names ln_q, mlp.0, mlp.2)."""

    def __init__(self, dim: int, out_dim: int, merge: int, norm: nn.Module) -> None:
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = norm
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    """patch_embed -> blocks -> merger over a flat sequence of images of any size.

    window: side of an attention window in merged units (None: every block attends over
    whole frames); full_blocks: the blocks that attend over whole frames anyway."""

    def __init__(
        self,
        patch_embed: PatchEmbed3D,
        blocks: list[VisionBlock],
        merger: PatchMerger,
        head_dim: int,
        merge: int,
        window: int | None = None,
        full_blocks: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.rotary_pos_emb = AxialRotaryEmbedding(head_dim)
        self.blocks = nn.ModuleList(blocks)
        self.merger = merger
        self.merge, self.window, self.full_blocks = merge, window, set(full_blocks)

    def forward(self, pixels: Tensor, grid_thw: Tensor | list[list[int]]) -> Tensor:
        """pixels [N, C * T * P * P], grid_thw [images, 3] -> features [N / merge^2, out]."""
        grid = grid_thw.tolist() if isinstance(grid_thw, Tensor) else grid_thw
        x = self.patch_embed(pixels)
        positions = grid_positions(grid, self.merge).to(x.device)
        cos, sin = self.rotary_pos_emb(positions, torch.float32)
        frames = frame_bounds(grid)
        windows, order = frames, None
        if self.window is not None:
            order, windows = window_order(grid, self.merge, self.window)
            order = order.to(x.device)
            x, cos, sin = (self._by_unit(t, order) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_blocks or order is None else windows)
        merged = self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]

    def _by_unit(self, x: Tensor, order: Tensor) -> Tensor:
        unit = self.merge * self.merge
        return x.view(-1, unit, x.shape[-1])[order].reshape(x.shape)
