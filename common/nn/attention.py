"""Multi-head / grouped-query attention: projections, rotary, and the hand-off to the forward context.

Nothing here knows about cache layout or kernels: q, k, v go to `ctx.attend`, which owns KV
storage and the attention backend.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from common.nn.mlp import stack_linears
from common.nn.rotary import RotaryEmbedding


class AttentionContext(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class SelfAttention(nn.Module):
    """Multi-head / grouped-query attention with HF names q_proj, k_proj, v_proj, o_proj."""

    def __init__(
        self,
        layer: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_qkv()
        self.rotary = [rotary]  # a list, so the shared module is not registered once per layer

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        kv = self.kv_heads * self.head_dim
        return self.heads * self.head_dim, kv, kv

    def fuse_qkv(self) -> None:
        """Stack q_proj, k_proj, v_proj into one qkv_proj (in place): one matmul reads x once
        and a decode step makes one weight pass instead of three. Same outputs; names no
        longer match HF, so fuse after loading."""
        if self.qkv_proj is None:
            self.qkv_proj = stack_linears(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary[0].apply_qk(q, k, cos, sin)
        out = ctx.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
