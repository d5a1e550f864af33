"""The pre-norm decoder stack shared by LLaMA-family models, with HF parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from common.nn.attention import AttentionContext, SelfAttention
from common.nn.norm import RMSNorm
from common.nn.rotary import RotaryEmbedding


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
