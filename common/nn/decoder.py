"""The pre-norm decoder stack shared by LLaMA-family models, with HF parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from common.nn.attention import AttentionContext, SelfAttention
from common.nn.norm import RMSNorm
from common.nn.rotary import RotaryEmbedding


class PreNormDecoderLayer(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h)): the LLaMA-family layer, with HF names.

    The residual stream is carried apart from each block's output (vLLM's layout), so the add
    before each norm happens inside the norm's `add`, where the fuse opt makes add + norm one
    kernel: forward(out, residual) takes the previous block's output not yet added to the
    stream and returns its own, with the stream so far."""

    def __init__(self, self_attn: SelfAttention, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(
        self, out: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor, ctx: AttentionContext
    ) -> tuple[Tensor, Tensor]:
        x, residual = self.input_layernorm.add(out, residual)
        x, residual = self.post_attention_layernorm.add(self.self_attn(x, cos, sin, ctx), residual)
        return self.mlp(x), residual


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

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        ctx: AttentionContext,
        embeds: tuple[Tensor, Tensor] | None = None,
        rope_positions: Tensor | None = None,
    ) -> Tensor:
        """embeds: (flat indices into [B * T], rows [K, hidden]) replacing those tokens'
        embeddings (content that placeholder tokens stand for, e.g. image features);
        rope_positions: rotary positions when they differ from the sequence positions that
        place K/V (e.g. M-RoPE's [axes, B, T])."""
        h = self.embed_tokens(input_ids)
        if embeds is not None:
            index, rows = embeds
            h = h.view(-1, h.shape[-1]).index_copy(0, index, rows.to(h.dtype)).view(h.shape)
        cos, sin = self.rotary_emb(positions if rope_positions is None else rope_positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, ctx)
        return self.norm.add(h, residual)[0]
