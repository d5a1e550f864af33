"""KV storage. Each cache turns the positions of the tokens being fed into an AttnMeta
(which cached keys each query may see) and stores/returns K/V per layer.

- `none`: keeps nothing; the engine re-feeds the whole sequence every step.
- `dynamic`: grows by concatenation every step (transformers' default; the baseline).
- `contiguous`: preallocated [B, Hkv, max_len, D] per layer, written in place (gpt-fast).

Rows of a batch are right-padded; padding tokens are marked invalid so no query sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from common.attention.meta import AttnMeta, PagedMeta, QuantizedKV
from common.core.errors import RecipeError
from common.kv.block_pool import BlockManager, BlockPool, OutOfBlocks
from common.kv.errors import OutOfKV
from common.kv.quant import SCALE_DTYPE, dequantize_kv, quantize_kv

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
    def begin(self, positions: Tensor, valid: Tensor, seq_ids: list[int] | None = None) -> AttnMeta:
        """Called once per forward with the new tokens' positions [B, T] and validity; caches
        that track sequences (paged) also get each row's sequence id."""

    @abstractmethod
    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v [B, Hkv, T, D]; return all keys/values visible this step."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes currently held for K/V."""

    def used_bytes(self) -> int:
        """Bytes holding real tokens (the rest of nbytes() is reserved but empty)."""
        return self.nbytes()

    def admit(self, seq_id: int, tokens: list[int]) -> int:
        """Reserve room for a sequence (caches that track sequences); returns cached tokens."""
        return 0

    def commit(self, seq_id: int, tokens: list[int]) -> None:
        """KV for `tokens` (a sequence's leading tokens) is written; prefix caches index it."""
        return None


class NoCache(KVCache):
    recompute = True

    def begin(self, positions: Tensor, valid: Tensor, seq_ids: list[int] | None = None) -> AttnMeta:
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

    def begin(self, positions: Tensor, valid: Tensor, seq_ids: list[int] | None = None) -> AttnMeta:
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

    def used_bytes(self) -> int:
        if self.key_pos is None:
            return 0
        return self.nbytes() * int((self.key_pos != _NEVER).sum()) // self.key_pos.numel()


class _Store:
    """A K or V tensor, optionally int8 with one scale per (token, head) vector."""

    def __init__(self, data: Tensor, scale: Tensor | None) -> None:
        self.data, self.scale = data, scale

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: torch.dtype, quantized: bool, device) -> _Store:
        if not quantized:
            return cls(torch.zeros(shape, dtype=dtype, device=device), None)
        scale = torch.zeros((*shape[:-1], 1), dtype=SCALE_DTYPE, device=device)
        return cls(torch.zeros(shape, dtype=torch.int8, device=device), scale)

    def write(self, index: tuple, x: Tensor) -> None:
        if self.scale is None:
            self.data[index] = x
        else:
            self.data[index], self.scale[index] = quantize_kv(x)

    def read(self, index: tuple, dtype: torch.dtype) -> Tensor:
        if self.scale is None:
            return self.data[index]
        return dequantize_kv(self.data[index], self.scale[index], dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)


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
        quantized: bool = False,
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.dtype = dtype
        self.k = [_Store.zeros(shape, dtype, quantized, device) for _ in range(num_layers)]
        self.v = [_Store.zeros(shape, dtype, quantized, device) for _ in range(num_layers)]
        self.max_len = max_len
        self.rows = torch.arange(batch, device=device)[:, None]
        self.positions: Tensor | None = None
        self.start: int | None = None  # set when every row writes the same contiguous range
        self.end = 0
        self.lengths = torch.zeros(batch, dtype=torch.long)  # tokens written per row

    def begin(self, positions: Tensor, valid: Tensor, seq_ids: list[int] | None = None) -> AttnMeta:
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
        return attn_meta(torch.arange(self.end, device=positions.device)[None], positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            if self.start is not None:  # one slice copy instead of a scatter
                store.write(
                    (slice(None), slice(None), slice(self.start, self.start + new.shape[2])), new
                )
            else:
                store.write((self.rows, slice(None), self.positions), new.transpose(1, 2))
        return tuple(
            s.read((slice(None), slice(None), slice(0, self.end)), self.dtype)
            for s in (self.k[layer], self.v[layer])
        )

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.k + self.v)

    def used_bytes(self) -> int:
        return self.nbytes() * int(self.lengths.sum()) // (self.max_len * len(self.lengths))


class PagedCache(KVCache):
    """vLLM-style paged KV: per layer a pool of fixed-size blocks, flat [slots, Hkv, D] with
    slot = block * block_size + offset; sequences own block tables (common/block_pool.py).
    Attention reads the pool through the block tables (common/paged_attention.py)."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        quantized: bool = False,
        prefix_cache: bool = False,
    ) -> None:
        self.blocks = BlockManager(BlockPool(num_blocks, block_size), prefix_cache)
        self.block_size, self.dtype, self.device = block_size, dtype, device
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [_Store.zeros(shape, dtype, quantized, device) for _ in range(num_layers)]
        self.v = [_Store.zeros(shape, dtype, quantized, device) for _ in range(num_layers)]
        self.bytes_per_token = sum(s.nbytes for s in self.k + self.v) // shape[0]
        self.slots: Tensor | None = None
        self.valid: Tensor | None = None
        self.live: set[int] = set()

    # -- KVSlots: the scheduler's view
    def admit(self, seq_id: int, tokens: list[int]) -> int:
        try:
            cached = self.blocks.allocate(seq_id, tokens)
        except OutOfBlocks as e:
            raise OutOfKV(str(e)) from e
        self.live.add(seq_id)
        return cached

    def grow(self, seq_id: int, num_tokens: int) -> None:
        extra = num_tokens - self.blocks.num_tokens(seq_id)
        if extra > 0:
            try:
                self.blocks.append(seq_id, extra)
            except OutOfBlocks as e:
                raise OutOfKV(str(e)) from e

    def release(self, seq_id: int) -> None:
        self.blocks.free(seq_id)
        self.live.discard(seq_id)

    def commit(self, seq_id: int, tokens: list[int]) -> None:
        self.blocks.commit(seq_id, tokens)

    # -- forward
    def begin(self, positions: Tensor, valid: Tensor, seq_ids: list[int] | None = None) -> AttnMeta:
        for src, dst in self.blocks.take_copies():  # copy-on-write of shared blocks
            bs = self.block_size
            for store in self.k + self.v:
                store.data[dst * bs : (dst + 1) * bs] = store.data[src * bs : (src + 1) * bs]
                if store.scale is not None:
                    store.scale[dst * bs : (dst + 1) * bs] = store.scale[src * bs : (src + 1) * bs]
        starts, lens = positions[:, 0].tolist(), valid.sum(1).tolist()
        slots = [self.blocks.slot_mapping(s, p, p + n) for s, p, n in zip(seq_ids, starts, lens)]
        self.slots = torch.tensor([x for row in slots for x in row], device=self.device)
        self.valid = valid
        tables = [self.blocks.block_table(s) for s in seq_ids]
        width = max(map(len, tables))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        seq_lens = torch.tensor([p + n for p, n in zip(starts, lens)])
        return AttnMeta(
            paged=PagedMeta(block_tables.to(self.device), positions, seq_lens.to(self.device))
        )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            store.write((self.slots,), new.transpose(1, 2)[self.valid])
        return self._pool(self.k[layer]), self._pool(self.v[layer])

    def _pool(self, store: _Store):
        """[num_blocks, block_size, Hkv, D] views (with scales when int8) for the kernel."""
        shape = (-1, self.block_size, *store.data.shape[1:])
        if store.scale is None:
            return store.data.view(shape)
        return QuantizedKV(store.data.view(shape), store.scale.view(*shape[:-1], 1))

    def nbytes(self) -> int:
        """Bytes of the blocks held by sequences (the pool itself is the budget)."""
        pool = self.blocks.pool
        return (pool.num_blocks - pool.num_free) * self.block_size * self.bytes_per_token

    def used_bytes(self) -> int:
        return sum(map(self.blocks.num_tokens, self.live)) * self.bytes_per_token


KV_KINDS = ("dynamic", "contiguous", "none", "paged")


def token_bytes(
    num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool
) -> int:
    """K + V bytes one token occupies across all layers, read off the storage format itself
    (int8: data plus one scale per head)."""
    one = _Store.zeros((1, kv_heads, head_dim), dtype, int8, "meta")
    return 2 * num_layers * one.nbytes


@dataclass(frozen=True)
class KVSpec:
    kind: str = "dynamic"
    int8: bool = False  # int8 K/V with per-token, per-head scales (contiguous and paged)
    block_size: int = 16  # paged
    budget_bytes: int | None = None  # paged pool size; None = room for the whole batch
    prefix_cache: bool = False  # paged: reuse full blocks across requests
    # contiguous: slots reserved per sequence, as a server sized for its longest accepted
    # request (vLLM's max_model_len); None = the batch's own longest sequence
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KV_KINDS:
            raise RecipeError(
                f"unknown kv_cache.kind {self.kind!r}; choose one of {', '.join(KV_KINDS)}"
            )
        if self.int8 and self.kind not in ("contiguous", "paged"):
            raise RecipeError(
                "int8 KV needs kv_cache.kind contiguous or paged (+opt=static_kv or paged_kv)"
            )
        if self.prefix_cache and self.kind != "paged":
            raise RecipeError("prefix_cache needs kv_cache.kind=paged (+opt=paged_kv)")
        if self.block_size <= 0:
            raise RecipeError(f"kv_cache.block_size must be > 0, got {self.block_size}")
        if self.max_len is not None and self.max_len <= 0:
            raise RecipeError(f"kv_cache.max_len must be > 0, got {self.max_len}")


def make_cache(
    spec: KVSpec,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    if spec.kind == "dynamic":
        return DynamicCache(num_layers)
    if spec.kind == "none":
        return NoCache()
    if spec.kind == "contiguous":
        if spec.max_len is not None and max_len > spec.max_len:
            raise RecipeError(
                f"a sequence needs {max_len} KV slots but kv_cache.max_len is {spec.max_len}"
            )
        slots = spec.max_len or max_len
        return ContiguousCache(
            num_layers, batch, kv_heads, head_dim, slots, dtype, device, spec.int8
        )
    block_bytes = spec.block_size * token_bytes(num_layers, kv_heads, head_dim, dtype, spec.int8)
    num_blocks = (
        int(spec.budget_bytes // block_bytes)
        if spec.budget_bytes
        else batch * -(-max_len // spec.block_size)
    )
    if num_blocks <= 0:
        raise RecipeError(
            f"KV budget {spec.budget_bytes} bytes holds no {block_bytes:.0f}-byte block"
        )
    return PagedCache(
        num_layers,
        kv_heads,
        head_dim,
        num_blocks,
        spec.block_size,
        dtype,
        device,
        spec.int8,
        spec.prefix_cache,
    )
