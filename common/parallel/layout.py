"""A parallel layout (tensor-parallel ranks x pipeline stages) and what one rank holds of a model.

Tensor parallel splits attention heads, KV heads, the MLP's intermediate channels and the
vocabulary across the ranks of a stage (Megatron-LM's layout, as vLLM runs it); pipeline
parallel splits the layers across stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.core.errors import RecipeError

if TYPE_CHECKING:
    from common.nn.causal_lm import ModelArgs


@dataclass(frozen=True)
class Layout:
    tp: int = 1  # tensor-parallel ranks per stage
    pp: int = 1  # pipeline stages

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise RecipeError(
                f"parallel layout needs tp >= 1 and pp >= 1, got tp={self.tp}, pp={self.pp}"
            )


ONE_DEVICE = Layout()


@dataclass(frozen=True)
class Shard:
    """What one tensor-parallel rank holds of the model's dims."""

    heads: int
    kv_heads: int  # KV heads replicated when there are fewer than ranks
    intermediate: int
    vocab: int  # padded up when the vocabulary does not divide
    stage_layers: tuple[int, ...]  # decoder layers on each pipeline stage


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage, as even as possible; the extra ones go to the stages before the last,
    which also holds the head (vLLM's rule)."""
    if pp > num_layers:
        raise RecipeError(f"{pp} pipeline stages for {num_layers} layers; use pp <= {num_layers}")
    base, extra = divmod(num_layers, pp)
    return tuple(base + (pp - 1 - extra <= s < pp - 1) for s in range(pp))


def kv_heads_of_rank(kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """KV heads [h0, h1) that tensor-parallel rank `rank` stores: an equal share, or, with
    fewer KV heads than ranks, the one head its group of tp / kv_heads ranks replicates."""
    if kv_heads >= tp:
        share = kv_heads // tp
        return rank * share, (rank + 1) * share
    head = rank // (tp // kv_heads)
    return head, head + 1


def shard(args: ModelArgs, layout: Layout) -> Shard:
    tp = layout.tp
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    intermediate = args.intermediate_size
    if heads % tp or intermediate % tp:
        raise RecipeError(
            f"tp={tp} must divide the {heads} attention heads and the MLP's {intermediate} channels"
        )
    if kv_heads % tp and tp % kv_heads:
        raise RecipeError(f"tp={tp} and the {kv_heads} KV heads must divide one another")
    h0, h1 = kv_heads_of_rank(kv_heads, tp, 0)
    return Shard(
        heads=heads // tp,
        kv_heads=h1 - h0,
        intermediate=intermediate // tp,
        vocab=-(-args.vocab_size // tp),
        stage_layers=stage_layers(args.num_hidden_layers, layout.pp),
    )
