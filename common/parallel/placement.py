"""What one rank of a parallel run reads of a checkpoint (io/checkpoint.py applies it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Read = Callable[[tuple[slice, ...]], Tensor]  # a slice of a checkpoint tensor


@dataclass(frozen=True)
class Part:
    """What one rank holds of a tensor: the blocks [start, end) along `dim`, concatenated,
    zero-padded to `size` (a vocabulary shard). An empty block list: zeros (the bias of a
    row-parallel layer lives on rank 0 only, so the all-reduce adds it once)."""

    dim: int
    blocks: tuple[tuple[int, int], ...]
    size: int

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.size if i == self.dim else n for i, n in enumerate(full))

    def take(self, read: Read, full: tuple[int, ...]) -> Tensor:
        lead = (slice(None),) * self.dim
        blocks = self.blocks or ((0, 0),)  # an empty slice still gives the dtype
        pieces = [read((*lead, slice(a, b))) for a, b in blocks]
        have = sum(p.shape[self.dim] for p in pieces) if self.blocks else 0
        if have < self.size:
            pad = list(self.shape(full))
            pad[self.dim] = self.size - have
            pieces.append(pieces[0].new_zeros(pad))
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0]


@dataclass(frozen=True)
class Placement:
    parts: dict[str, Part] = field(default_factory=dict)  # tensor-parallel slices, by name
    # parameter -> the checkpoint tensor it holds: a tied head on a pipeline stage of its own
    aliases: dict[str, str] = field(default_factory=dict)
    subset: bool = False  # a pipeline stage: the checkpoint's other tensors are not read


Place = Callable[[nn.Module], Placement]  # prunes / reshapes a meta model, says what it reads


def combined(*places: Place | None) -> Place | None:
    """Each placement in turn on the same meta model (a pipeline stage's pruning, then tensor
    parallel's slicing of what is left); their slices, aliases and subset merged."""
    steps = [p for p in places if p is not None]
    if len(steps) <= 1:
        return steps[0] if steps else None

    def place(model: nn.Module) -> Placement:
        done = [step(model) for step in steps]
        return Placement(
            {k: v for p in done for k, v in p.parts.items()},
            {k: v for p in done for k, v in p.aliases.items()},
            any(p.subset for p in done),
        )

    return place
