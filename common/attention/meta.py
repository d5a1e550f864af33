"""What a forward pass tells attention: which keys each query sees, where paged K/V live, and the\ncontext that joins KV storage to an attention kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class PagedMeta:
    """Where each row's K/V lives in a paged pool: block ids per row [B, max_blocks] (int32),
    query positions [B, Tq], and the number of cached tokens per row (new ones included).
    q_lens: a packed forward (B = 1 row of Tq tokens holding several sequences' queries one
    after another, vLLM's varlen layout): each sequence's query count, in order; tables and
    seq_lens then have one row per sequence."""

    block_tables: Tensor
    q_pos: Tensor
    seq_lens: Tensor
    q_lens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AttnMeta:
    """Which keys each query may see. mask: bool [B, 1, Tq, S], True = attend.
    mask None + causal: plain causal prefill (Tq == S); mask None + not causal: see all keys.
    lens [B]: one query per row, which sees its row's first lens[b] keys (a decode step
    with static shapes: K/V are read at full length, the lengths are data, not shapes).
    paged: set when K/V are block pools read through block tables.
    static: a decode step whose shapes are the same every step (a compiled step may run it)."""

    mask: Tensor | None = None
    causal: bool = False
    paged: PagedMeta | None = None
    lens: Tensor | None = None
    static: bool = False

    def dense_mask(self, tq: int, s: int, device: torch.device) -> Tensor | None:
        if self.lens is not None:
            return (torch.arange(s, device=device) < self.lens[:, None])[:, None, None]
        if self.mask is not None or not self.causal:
            return self.mask
        return torch.ones(tq, s, dtype=torch.bool, device=device).tril(s - tq)

    @functools.cached_property
    def prefix_lens(self) -> Tensor | None:
        """With a mask for one query per row: how many leading keys each row sees (CPU
        int64 [B]), or None when a row's visible keys have holes. Cached, so the layers of
        one forward share it."""
        if self.lens is not None:
            return self.lens
        seen = self.mask[:, 0, 0]  # [B, S]
        lens = seen.sum(-1)
        prefix = torch.arange(seen.shape[-1], device=seen.device) < lens[:, None]
        return lens.cpu() if torch.equal(seen, prefix) else None


Backend = Callable[[Tensor, Tensor, Tensor, AttnMeta], Tensor]


class KVStore(Protocol):
    """What a forward pass needs from KV storage (common/kv/rows.py, common/kv/paged.py)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class ForwardContext:
    """Joins KV storage and an attention kernel for one forward pass; passed to the model."""

    cache: KVStore
    backend: Backend
    meta: AttnMeta

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_all, v_all = self.cache.update(layer, k, v)
        return self.backend(q, k_all, v_all, self.meta)
