"""KV storage. Each cache turns the positions of the tokens being fed into an AttnMeta
(which cached keys each query may see) and stores/returns K/V per layer.

- `none`: keeps nothing; the engine re-feeds the whole sequence every step.
- `dynamic`: grows by concatenation every step (transformers' default; the baseline).
- `contiguous`: preallocated [B, Hkv, max_len, D] per layer, written in place (gpt-fast).

Rows of a batch are right-padded; padding tokens are marked invalid so no query sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from common.attention import AttnMeta
from common.errors import RecipeError

_NEVER = torch.iinfo(torch.int64).max  # key position of padding: above every query position


def attn_meta(key_pos: Tensor, query_pos: Tensor) -> AttnMeta:
    """Query at position p sees keys at positions <= p. Uses the mask-free fast paths
    (all visible, or plain causal) whenever the mask reduces to one of them."""
    mask = key_pos[:, None, None, :] <= query_pos[:, None, :, None]
    if bool(mask.all()):
        return AttnMeta()
    t, s = query_pos.shape[1], key_pos.shape[1]
    if t == s and torch.equal(
        mask, AttnMeta(causal=True).dense_mask(t, s, mask.device).expand_as(mask)
    ):
        return AttnMeta(causal=True)
    return AttnMeta(mask=mask)


class KVCache(ABC):
    recompute: bool = False  # True: the engine feeds the full sequence every step

    @abstractmethod
    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        """Called once per forward with the new tokens' positions [B, T] and validity."""

    @abstractmethod
    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v [B, Hkv, T, D]; return all keys/values visible this step."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes currently held for K/V."""


class NoCache(KVCache):
    recompute = True

    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        return attn_meta(positions.masked_fill(~valid, _NEVER), positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def nbytes(self) -> int:
        return 0


class DynamicCache(KVCache):
    def __init__(self, num_layers: int) -> None:
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.key_pos: Tensor | None = None

    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        new = positions.masked_fill(~valid, _NEVER)
        self.key_pos = new if self.key_pos is None else torch.cat((self.key_pos, new), dim=1)
        return attn_meta(self.key_pos, positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)


class ContiguousCache(KVCache):
    """Slot = position: a token at position p of row b lives at [b, :, p]. Padding slots
    are overwritten by that row's later tokens before any query can see them."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.rows = torch.arange(batch, device=device)[:, None]
        self.positions: Tensor | None = None
        self.start: int | None = None  # set when every row writes the same contiguous range
        self.end = 0

    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise RecipeError(f"sequence needs {end} KV slots but the cache holds {self.max_len}")
        self.end = max(self.end, end)
        first = positions[:, :1]
        uniform = bool(
            (
                positions == first[:1] + torch.arange(positions.shape[1], device=positions.device)
            ).all()
        )
        self.start = int(first[0, 0]) if uniform else None
        self.positions = positions
        return attn_meta(torch.arange(self.end, device=positions.device)[None], positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self.k[layer], self.v[layer]
        if self.start is not None:  # one slice copy instead of a scatter
            kb[:, :, self.start : self.start + k.shape[2]] = k
            vb[:, :, self.start : self.start + v.shape[2]] = v
        else:
            kb[self.rows, :, self.positions] = k.transpose(1, 2)
            vb[self.rows, :, self.positions] = v.transpose(1, 2)
        return kb[:, :, : self.end], vb[:, :, : self.end]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


KV_KINDS = ("dynamic", "contiguous", "none")


def make_cache(
    kind: str,
    num_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    if kind == "dynamic":
        return DynamicCache(num_layers)
    if kind == "contiguous":
        return ContiguousCache(num_layers, batch, kv_heads, head_dim, max_len, dtype, device)
    if kind == "none":
        return NoCache()
    raise RecipeError(f"unknown kv_cache.kind {kind!r}; choose one of {', '.join(KV_KINDS)}")
