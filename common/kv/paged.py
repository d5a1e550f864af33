"""Paged K/V storage (runner side): per layer a pool of fixed-size blocks, flat
[slots, Hkv, D] with slot = block * block_size + offset, int8 as QuantizedKV. Which blocks
a sequence owns is the KV manager's business (common/kv/manager.py); the storage writes
where the runner's slot mapping says, applies the manager's copies and swaps, and hands
the attention kernels [num_blocks, block_size, Hkv, D] views.

A storage holds KV heads [h0, h1) of the model (a tensor-parallel rank's share); the
model's attention passes it exactly those heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.attention.meta import AttnMeta, PagedMeta
from common.core.errors import RecipeError
from common.kv.ops import KVOps
from common.kv.quant import KVTensor, kv_map, kv_nbytes, kv_parts, kv_write, kv_zeros
from common.kv.spec import KVSpec


def token_bytes(
    num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool
) -> int:
    """K + V bytes one token occupies across all layers, read off the storage format itself
    (int8: data plus one scale per head)."""
    return 2 * num_layers * kv_nbytes(kv_zeros((1, kv_heads, head_dim), dtype, int8, "meta"))


def num_blocks_for(
    spec: KVSpec,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch: int,
    max_len: int,
) -> int:
    """Pool size: the byte budget's worth of blocks, or room for `batch` max_len sequences."""
    block_bytes = spec.block_size * token_bytes(num_layers, kv_heads, head_dim, dtype, spec.int8)
    if not spec.budget_bytes:
        return batch * -(-max_len // spec.block_size)
    n = int(spec.budget_bytes // block_bytes)
    if n <= 0:
        raise RecipeError(
            f"KV budget {spec.budget_bytes} bytes holds no {block_bytes:.0f}-byte block"
        )
    return n


class PagedStorage:
    def __init__(
        self,
        num_layers: int,
        heads: tuple[int, int],
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        int8: bool = False,
        static: bool = False,
    ) -> None:
        """static: decode steps keep their shapes (common/kv/spec.py); one more block, which
        no sequence owns, takes the writes of the rows that pad a decode batch."""
        self.heads, self.block_size, self.dtype = heads, block_size, dtype
        self.static, self.dense_write = static, False
        self.num_blocks = num_blocks  # owned by sequences; a static storage has one more
        self.scratch_slot = num_blocks * block_size
        shape = ((num_blocks + static) * block_size, heads[1] - heads[0], head_dim)
        self.k: list[KVTensor] = [kv_zeros(shape, dtype, int8, device) for _ in range(num_layers)]
        self.v: list[KVTensor] = [kv_zeros(shape, dtype, int8, device) for _ in range(num_layers)]
        self.bytes_per_token = sum(map(kv_nbytes, self.k + self.v)) // shape[0]
        self.host: dict[int, list[KVTensor]] = {}  # swapped-out blocks, per layer K then V
        self.slots: Tensor | None = None
        self.valid: Tensor | None = None

    def _block(self, store: KVTensor, block: int) -> KVTensor:
        bs = self.block_size
        return kv_map(store, lambda t: t[block * bs : (block + 1) * bs])

    def apply(self, ops: KVOps) -> None:
        stores = self.k + self.v
        for block, host in ops.swap_out:
            self.host[host] = [
                kv_map(self._block(s, block), lambda t: t.to("cpu", copy=True)) for s in stores
            ]
        for src, dst in ops.copies:
            for s in stores:
                for d, x in zip(kv_parts(self._block(s, dst)), kv_parts(self._block(s, src))):
                    d.copy_(x)
        for host, block in ops.swap_in:
            for s, saved in zip(stores, self.host.pop(host)):
                for d, x in zip(kv_parts(self._block(s, block)), kv_parts(saved)):
                    d.copy_(x)

    def begin(
        self,
        positions: Tensor,
        valid: Tensor,
        block_tables: Tensor,
        slots: Tensor,
        seq_lens: Tensor,
        q_lens: tuple[int, ...] | None = None,
    ) -> AttnMeta:
        """One forward: where its valid tokens go (slots, flat), and each row's blocks (each
        sequence's, for a packed forward: see PagedMeta.q_lens). A static decode step and a
        packed forward write every token (a static step's padding rows to the scratch slot)."""
        self.slots, self.valid = slots, valid
        static = self.static and positions.shape[1] == 1 and q_lens is None
        self.dense_write = static or q_lens is not None
        meta = PagedMeta(block_tables, positions, seq_lens, q_lens)
        return AttnMeta(paged=meta, static=static)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[KVTensor, KVTensor]:
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            rows = new.transpose(1, 2)  # [B, T, Hkv, D]
            kv_write(
                store, (self.slots,), rows.flatten(0, 1) if self.dense_write else rows[self.valid]
            )
        return self.pool(self.k[layer]), self.pool(self.v[layer])

    def pool(self, store: KVTensor) -> KVTensor:
        """[num_blocks, block_size, Hkv, D] views (scales [..., 1] when int8) for the kernels."""
        return kv_map(store, lambda t: t.view(-1, self.block_size, *t.shape[1:]))
