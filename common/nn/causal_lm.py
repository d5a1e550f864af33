"""What every model gives the engine: hyper-parameters with HF config names, and the LM interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar

from torch import Tensor, nn

from common.core.errors import RecipeError
from common.core.request import MultimodalItem
from common.nn.attention import AttentionContext, SelfAttention
from common.nn.decoder import DecoderModel, PreNormDecoderLayer
from common.nn.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ModelArgs:
    """Base for architecture hyper-parameters; field names follow HF config.json keys."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int | None = None
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    intermediate_size: int = 0  # the MLP's hidden width

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        """(q/k/v, o_proj, MLP) biases: each family's modeling code, not config.json,
        decides what `attention_bias` covers."""
        return False, False, False

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_hf_config(self) -> dict:
        """kwargs for the transformers config class of this architecture."""
        raise NotImplementedError

    @classmethod
    def from_hf_config(cls, d: dict) -> ModelArgs:
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        """Keep the keys this architecture uses; ignore the rest of an HF config."""
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if missing := [k for k in required if k not in d]:
            raise RecipeError(f"model config lacks {', '.join(missing)} (needed by {cls.__name__})")
        return cls(**{k: v for k, v in d.items() if k in names})


def pre_norm_decoder(
    args: ModelArgs,
    rotary: RotaryEmbedding,
    mlp: Callable[[], nn.Module],
    eps: float,
    qkv_bias: bool = False,
    o_bias: bool = False,
) -> DecoderModel:
    """The LLaMA-family stack: families differ in rotary variant, biases and MLP only."""
    layers = [
        PreNormDecoderLayer(
            SelfAttention(
                i,
                args.hidden_size,
                args.num_attention_heads,
                args.num_key_value_heads,
                args.kv_head_dim,
                rotary,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
            ),
            mlp(),
            args.hidden_size,
            eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return DecoderModel(args.vocab_size, args.hidden_size, eps, rotary, layers)


class CausalLM(nn.Module):
    """A decoder-only LM: forward(ids, positions, ctx) -> final hidden; logits(hidden)."""

    args_cls: ClassVar[type[ModelArgs]]
    hf_class_name: ClassVar[str]  # the transformers class of this architecture (oracle, peer)
    # (regex, replacement) from an earlier checkpoint layout of this architecture to its names
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # submodules that encode content (a vision tower): the language-model opts leave them be
    encoder_modules: ClassVar[tuple[str, ...]] = ()
    tied_weights: dict[str, str]
    # KV heads [h0, h1) this rank computes and stores (set by tensor parallel); None = all
    kv_head_range: tuple[int, int] | None = None

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tied_weights = (
            {"lm_head.weight": "model.embed_tokens.weight"} if args.tie_word_embeddings else {}
        )

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, **extra: Tensor
    ) -> Tensor:
        return self.model(input_ids, positions, ctx, **extra)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)


class MultimodalLM(CausalLM):
    """A CausalLM whose prompts hold placeholder tokens for content an encoder embeds (images).

    The engine asks it for each item's features (`encode`, batched over items) and, once per
    sequence, for the rotary positions of the prompt when they are not 0, 1, 2, ... (M-RoPE
    gives image tokens grid coordinates); forward then takes the features and positions as
    `embeds` and `rope_positions` (common/nn/decoder.py)."""

    def encode(self, items: list[MultimodalItem]) -> list[Tensor]:
        """Features [item.length, hidden] for each item."""
        raise NotImplementedError

    def rope_table(self, prompt_len: int, items: list[MultimodalItem]) -> tuple[Tensor, int] | None:
        """(rotary positions of the prompt [axes, prompt_len], offset of every later token:
        its position is its index + offset), or None when positions are plain indices."""
        return None

    # transformers' image processor class (PIL backend) and its settings for this model
    image_processor: ClassVar[str] = ""

    def image_processor_config(self) -> dict:
        return {}

    def image_placeholder(self, length: int) -> tuple[list[int], int]:
        """The tokens an image of `length` features takes in a prompt, and where its
        placeholder run starts among them (e.g. <vision_start> <image> * length <vision_end>)."""
        raise NotImplementedError
