"""Row KV storage: one fixed row per sequence of a static batch, rows right-padded.

- `none`: keeps nothing; the runner re-feeds the whole sequence every step.
- `dynamic`: grows by concatenation every step (transformers' default; the baseline).
- `contiguous`: preallocated [B, Hkv, max_len, D] per layer, written in place (gpt-fast).

Every row advances in every forward; padding tokens are marked invalid so no query sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from common.attention.meta import AttnMeta
from common.core.errors import RecipeError
from common.kv.quant import KVTensor, kv_map, kv_nbytes, kv_read, kv_write, kv_zeros
from common.kv.spec import KVSpec

STATIC_MIN_SLOTS = 128
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


class RowStorage(ABC):
    stores_kv: bool = True  # False: the runner feeds the full sequence every step

    @abstractmethod
    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        """Called once per forward with the new tokens' positions [B, T] and validity."""

    @abstractmethod
    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v [B, Hkv, T, D]; return all keys/values visible this step."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes currently held for K/V."""

    def used_bytes(self) -> int:
        """Bytes holding real tokens (the rest of nbytes() is reserved but empty)."""
        return self.nbytes()

    def truncate(self, row: int, keep: int) -> None:
        """Forget row's tokens at positions >= keep (a rejected speculation)."""
        return None

    def reorder(self, index: list[int]) -> None:
        """Row i becomes a copy of row index[i] (beam search)."""
        raise RecipeError(f"{type(self).__name__} keeps no KV to reorder")


class NoCache(RowStorage):
    stores_kv = False

    def begin(self, positions: Tensor, valid: Tensor) -> AttnMeta:
        return attn_meta(positions.masked_fill(~valid, _NEVER), positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def nbytes(self) -> int:
        return 0


class DynamicCache(RowStorage):
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

    def reorder(self, index: list[int]) -> None:
        if self.key_pos is not None:
            self.k = [t[index] for t in self.k]
            self.v = [t[index] for t in self.v]
            self.key_pos = self.key_pos[index]

    def truncate(self, row: int, keep: int) -> None:
        # Concatenated keys cannot shrink per row: hide them from every later query.
        if self.key_pos is not None:
            self.key_pos[row].masked_fill_(self.key_pos[row] >= keep, _NEVER)

    def used_bytes(self) -> int:
        if self.key_pos is None:
            return 0
        return self.nbytes() * int((self.key_pos != _NEVER).sum()) // self.key_pos.numel()


class ContiguousCache(RowStorage):
    """Slot = position: a token at position p of row b lives at [b, :, p]. Padding slots
    are overwritten by that row's later tokens before any query can see them.

    static: a decode step's shapes do not change from step to step (what a compiled step
    needs): K/V are written by position tensors and read whole, and each row sees its first
    position + 1 slots (AttnMeta.lens), so the step's graph holds no step-dependent size."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        int8: bool = False,
        static: bool = False,
    ) -> None:
        shape = (rows, kv_heads, max_len, head_dim)
        self.static = static
        self.dtype = dtype
        self.k: list[KVTensor] = [kv_zeros(shape, dtype, int8, device) for _ in range(num_layers)]
        self.v: list[KVTensor] = [kv_zeros(shape, dtype, int8, device) for _ in range(num_layers)]
        self.max_len = max_len
        self.row_ids = torch.arange(rows, device=device)[:, None]
        self.positions: Tensor | None = None
        self.start: int | None = None  # set when every row writes the same contiguous range
        self.end = 0
        self.lengths = torch.zeros(rows, dtype=torch.long)  # tokens written per row

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
        written = (positions.masked_fill(~valid, -1).amax(1) + 1).cpu()
        self.lengths = torch.maximum(self.lengths, written)
        if self.static and positions.shape[1] == 1:
            self.start, self.end = None, self.max_len  # scatter by position, read it all
            return AttnMeta(lens=positions[:, 0] + 1, static=True)
        return attn_meta(torch.arange(self.end, device=positions.device)[None], positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.start is not None:  # one slice copy instead of a scatter
                index = (slice(None), slice(None), slice(self.start, self.start + new.shape[2]))
                kv_write(store, index, new)
            else:
                kv_write(store, (self.row_ids, slice(None), self.positions), new.transpose(1, 2))
        visible = (slice(None), slice(None), slice(0, self.end))
        return kv_read(self.k[layer], visible, self.dtype), kv_read(
            self.v[layer], visible, self.dtype
        )

    def nbytes(self) -> int:
        return sum(map(kv_nbytes, self.k + self.v))

    def used_bytes(self) -> int:
        return self.nbytes() * int(self.lengths.sum()) // (self.max_len * len(self.lengths))

    def reorder(self, index: list[int]) -> None:
        rows = torch.tensor(index, device=self.row_ids.device)
        self.k = [kv_map(t, lambda x: x[rows]) for t in self.k]
        self.v = [kv_map(t, lambda x: x[rows]) for t in self.v]
        self.lengths = self.lengths[index]

    def truncate(self, row: int, keep: int) -> None:
        # Slot = position: a later query at position p reads slots <= p, all rewritten by then.
        self.lengths[row] = min(int(self.lengths[row]), keep)


def _bucket(max_len: int) -> int:
    """Slots for a static-shape cache sized by its batch: the next power of two (at least
    STATIC_MIN_SLOTS), so a compiled decode step serves batches of many lengths with a few
    graphs instead of one per length (torch.compile stops recompiling after a few)."""
    return max(STATIC_MIN_SLOTS, 1 << (max_len - 1).bit_length())


def make_rows(
    spec: KVSpec,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    rows: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> RowStorage:
    """Storage for a static batch of `rows` sequences, the longest max_len tokens."""
    if spec.kind == "dynamic":
        return DynamicCache(num_layers)
    if spec.kind == "none":
        return NoCache()
    if spec.kind != "contiguous":
        raise RecipeError(f"kv_cache.kind={spec.kind} is not a row storage")
    if spec.max_len is not None and max_len > spec.max_len:
        raise RecipeError(
            f"a sequence needs {max_len} KV slots but kv_cache.max_len is {spec.max_len}"
        )
    slots = spec.max_len or (_bucket(max_len) if spec.static else max_len)
    return ContiguousCache(
        num_layers, rows, kv_heads, head_dim, slots, dtype, device, spec.int8, spec.static
    )
