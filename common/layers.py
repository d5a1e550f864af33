"""Model math shared by decoder families: norms, rotary embeddings, MLP, attention block.

Nothing here knows about cache layout or kernels: attention hands q, k, v to the
forward context (`ctx.attend`), which owns KV storage and the attention backend.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cpu_kernels import KERNEL_DTYPES, cpu_kernels_available, rms_norm_cpp


class AttentionContext(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        on_cpu_kernel = x.is_cpu and x.dtype in KERNEL_DTYPES and x.dtype == self.weight.dtype
        if on_cpu_kernel and cpu_kernels_available():
            return rms_norm_cpp(x, self.weight, self.eps)  # the math below in one call
        if x.device.type == "npu":
            return _npu_rms_norm(x, self.weight, self.eps)
        # fp32 statistics, cast back before the scale: the transformers formulation.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _npu_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    import torch_npu  # unverified: no NPU in CI

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


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
    """cos/sin tables for given positions; `apply` rotates with the rotate-half convention."""

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

    @staticmethod
    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, H, T, D]; cos/sin [B, T, rot_dim] rotate the first rot_dim channels."""
        cos, sin = cos[:, None], sin[:, None]
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = x_rot * cos + self.rotate(x_rot) * sin
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fused(self) -> FusedGatedMLP:
        """The same MLP with gate and up stacked in one gate_up_proj (one matmul)."""
        hidden, intermediate = self.gate_proj.in_features, self.gate_proj.out_features
        with torch.device("meta"):  # its own linears are replaced: allocate nothing for them
            mlp = FusedGatedMLP(hidden, intermediate, bias=self.gate_proj.bias is not None)
        mlp.gate_up_proj = stack_linears(self.gate_proj, self.up_proj)
        mlp.down_proj = self.down_proj
        return mlp


def stack_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear computing the given ones (same input) as consecutive output channels."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


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
        rotary = self.rotary[0]
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        out = ctx.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class InterleavedRotaryEmbedding(RotaryEmbedding):
    """Rotary on adjacent channel pairs (2i, 2i+1) instead of the two halves: the GPT-J /
    GLM layout. Checkpoints trained with it need it; the two layouts are not interchangeable."""

    @staticmethod
    def layout(freqs: Tensor) -> Tensor:
        return freqs.repeat_interleave(2, dim=-1)

    @staticmethod
    def rotate(x: Tensor) -> Tensor:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class FusedGatedMLP(nn.Module):
    """SwiGLU with gate and up stacked in one matrix, HF names gate_up_proj / down_proj
    (GLM-4, Phi-3): one matmul reads x once; the output's first half is the gate."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class PreNormDecoderLayer(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h)): the LLaMA-family layer, with HF names."""

    def __init__(self, self_attn: SelfAttention, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """embed_tokens -> layers (sharing one rotary table per forward) -> norm; HF names."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        eps: float,
        rotary: RotaryEmbedding,
        layers: list[nn.Module],
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.rotary_emb = rotary
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack the projections that read the same input, in place: q/k/v of every SelfAttention,
    gate/up of every GatedMLP. Outputs are unchanged; run it after loading (names change)."""
    for module in list(model.modules()):
        if isinstance(module, SelfAttention):
            module.fuse_qkv()
        for name, child in module.named_children():
            if isinstance(child, GatedMLP):
                setattr(module, name, child.fused())
    return model
