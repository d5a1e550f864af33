"""Rotary position embeddings: rotate-half (LLaMA) and interleaved (GPT-J / GLM) layouts, llama3 scaling."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from common import ops


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """Inverse frequencies for `dim` rotated channels; `scaling` follows HF rope_parameters."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: default, llama3")
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; `apply` rotates with the rotate-half convention.
    `fused` (set by the fuse opt): q and k rotate in one kernel call (ops.rotary)."""

    interleaved: ClassVar[bool] = False  # the channel layout ops.rotary is told
    fused = False

    def __init__(self, rot_dim: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rot_dim, theta, scaling), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, rot_dim / 2]
        emb = self.layout(freqs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def layout(freqs: Tensor) -> Tensor:
        return torch.cat((freqs, freqs), dim=-1)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, H, T, D]; cos/sin [B, T, rot_dim] rotate the first rot_dim channels."""
        return ops.apply_rotary(x, cos, sin, self.interleaved)

    def apply_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Both of attention's rotated inputs: one kernel call when fused, else each alone
        (the same math, the same roundings)."""
        if self.fused:
            return ops.rotary(q, k, cos, sin, self.interleaved)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)


class InterleavedRotaryEmbedding(RotaryEmbedding):
    """Rotary on adjacent channel pairs (2i, 2i+1) instead of the two halves: the GPT-J /
    GLM layout. Checkpoints trained with it need it; the two layouts are not interchangeable."""

    interleaved = True

    @staticmethod
    def layout(freqs: Tensor) -> Tensor:
        return freqs.repeat_interleave(2, dim=-1)


class MultiAxisRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary (M-RoPE, Qwen2-VL): positions carry several axes (temporal, height,
    width), and each band of `sections[i]` frequencies follows axis i % axes. Text tokens have
    the same value on every axis, which is plain rotary; image tokens get their grid
    coordinates. Positions [axes, B, T]; [B, T] means the same on every axis."""

    def __init__(self, rot_dim: int, theta: float, sections: list[int]) -> None:
        super().__init__(rot_dim, theta)
        if sum(sections) != rot_dim // 2:
            raise ValueError(f"rotary sections {sections} must sum to {rot_dim // 2}")
        self.sections = list(sections)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if positions.dim() == 2:
            return super().forward(positions, dtype)
        freqs = positions[..., None].float() * self.inv_freq  # [axes, B, T, rot_dim / 2]
        axes = freqs.shape[0]
        bands = freqs.split(self.sections, dim=-1)
        emb = self.layout(torch.cat([band[i % axes] for i, band in enumerate(bands)], dim=-1))
        return emb.cos().to(dtype), emb.sin().to(dtype)


class AxialRotaryEmbedding(RotaryEmbedding):
    """2-D (or n-D) rotary for patches of an image (ViT): the head's rotated half splits into
    one block per axis, all using the same frequencies; positions [N, axes] (e.g. row, column)
    give cos/sin [N, head_dim] over the whole head."""

    def __init__(self, head_dim: int, theta: float = 10000.0, axes: int = 2) -> None:
        super().__init__(head_dim // axes, theta)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = (positions[..., None].float() * self.inv_freq).flatten(-2)  # [N, head_dim / 2]
        emb = self.layout(freqs)
        return emb.cos().to(dtype), emb.sin().to(dtype)
