"""KV managers (scheduler side): which sequence owns which KV, and the storage work each
step needs (KVOps). They never touch tensors; the runner applies the ops to the storage.

- `PagedKVManager`: blocks from a pool (common/kv/block_pool.py) with prefix caching,
  copy-on-write fork, rewind, and swapping a sequence's blocks out to host memory and back.
- `RowKVManager`: a static batch's sequences each get a row; a batch's rows are released
  together when its last sequence ends.

Both raise OutOfKV when there is no room (the scheduler preempts or waits).
"""

from __future__ import annotations

import itertools
from typing import Protocol

from common.core.errors import RecipeError
from common.kv.block_pool import BlockManager, BlockPool, ExtraKey, OutOfBlocks
from common.kv.errors import OutOfKV
from common.kv.ops import KVOps


class KVManager(Protocol):
    stores_kv: bool  # False: nothing is kept between steps (recompute every token)

    def allocate(
        self, seq_id: int, tokens: list[int], max_len: int, extras: tuple[ExtraKey, ...] = ()
    ) -> int:
        """Room for a new sequence (max_len: its final length); returns its cached tokens."""

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make room for the sequence to hold num_tokens in total."""

    def free(self, seq_id: int) -> None: ...

    def rewind(self, seq_id: int, num_tokens: int) -> None:
        """Forget the sequence's last num_tokens tokens (a rejected speculation)."""

    def commit(self, seq_id: int, tokens: list[int], num_tokens: int) -> None:
        """KV of the first num_tokens `tokens` is written (prefix caches index it)."""

    def locate(self, seq_id: int) -> int | list[int]:
        """Where its KV lives: a row, or a block table."""

    def take_ops(self) -> KVOps: ...

    def usage(self) -> tuple[int, int] | None:
        """(reserved, used) token slots, or None when the storage measures itself."""


class PagedKVManager:
    stores_kv = True

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False) -> None:
        self.blocks = BlockManager(BlockPool(num_blocks, block_size), prefix_cache)
        self.block_size = block_size
        self.ops = KVOps()
        self.swapped: dict[int, tuple[list[int], int, tuple[ExtraKey, ...]]] = {}
        self._host_ids = itertools.count()  # never reused: a step's ops cannot collide

    def allocate(
        self, seq_id: int, tokens: list[int], max_len: int, extras: tuple[ExtraKey, ...] = ()
    ) -> int:
        try:
            return self.blocks.allocate(seq_id, tokens, extras)
        except OutOfBlocks as e:
            raise OutOfKV(str(e)) from e

    def grow(self, seq_id: int, num_tokens: int) -> None:
        extra = num_tokens - self.blocks.num_tokens(seq_id)
        if extra > 0:
            try:
                self.blocks.append(seq_id, extra)
            except OutOfBlocks as e:
                raise OutOfKV(str(e)) from e

    def free(self, seq_id: int) -> None:
        self.blocks.free(seq_id)

    def commit(self, seq_id: int, tokens: list[int], num_tokens: int) -> None:
        self.blocks.commit(seq_id, tokens, num_tokens)

    def fork(self, src_id: int, dst_id: int) -> None:
        """dst shares src's blocks (beam search, parallel sampling); a write to a shared,
        partly filled block copies it first (copy-on-write, in the next step's ops)."""
        self.blocks.fork(src_id, dst_id)

    def rewind(self, seq_id: int, num_tokens: int) -> None:
        """Forget the sequence's last num_tokens tokens (a rejected speculation)."""
        self.blocks.rewind(seq_id, num_tokens)

    def swap_out(self, seq_id: int) -> None:
        """Move the sequence's blocks to host memory; its device blocks are freed."""
        table, n, extras = self.blocks.detach(seq_id)
        host = [next(self._host_ids) for _ in table]
        # A block whose copy-on-write is still pending holds nothing yet: save its source.
        pending = {dst: src for src, dst in self.blocks.copies}
        self.ops.swap_out += [(pending.get(b, b), h) for b, h in zip(table, host)]
        for block in reversed(table):
            self.blocks.pool.decref(block)
        self.swapped[seq_id] = (host, n, extras)

    def swap_in(self, seq_id: int, num_tokens: int) -> None:
        """Bring the sequence back to fresh device blocks, with room for num_tokens."""
        host, n, extras = self.swapped[seq_id]
        try:
            table = self.blocks.attach(seq_id, max(n, num_tokens), extras)
        except OutOfBlocks as e:
            raise OutOfKV(str(e)) from e
        del self.swapped[seq_id]
        self.ops.swap_in += zip(host, table)

    def locate(self, seq_id: int) -> list[int]:
        return self.blocks.block_table(seq_id)

    def take_ops(self) -> KVOps:
        ops, self.ops = self.ops, KVOps()
        ops.copies = self.blocks.take_copies()
        return ops

    def usage(self) -> tuple[int, int]:
        pool = self.blocks.pool
        reserved = (pool.num_blocks - pool.num_free) * self.block_size
        return reserved, sum(self.blocks.lengths.values())


class RowKVManager:
    """Row storage holds one static batch: rows are handed out in admission order and are
    all released when the batch's last sequence is freed (finished rows wait, as in a
    padded batch). Rows are sized for their sequence's final length, so growing is free.
    slack: extra slots per row, for a step that computes tokens past a row's end (a row
    padded to a speculation's k + 1 tokens)."""

    def __init__(self, stores_kv: bool = True, slack: int = 0) -> None:
        self.stores_kv, self.slack = stores_kv, slack
        self.rows: dict[int, int] = {}
        self.live: set[int] = set()
        self.lengths: dict[int, int] = {}  # slots each sequence has been given
        self.longest = 0
        self.new_batch = False
        self.truncate: list[tuple[int, int]] = []

    def allocate(
        self, seq_id: int, tokens: list[int], max_len: int, extras: tuple[ExtraKey, ...] = ()
    ) -> int:
        if not self.live:  # the previous batch is over: a fresh storage
            self.rows, self.lengths, self.longest, self.new_batch = {}, {}, 0, True
        elif self.new_batch is False:
            raise RecipeError("row KV storage admits a batch only when the previous one is over")
        self.rows[seq_id] = len(self.rows)
        self.live.add(seq_id)
        self.longest = max(self.longest, max_len)
        return 0

    def grow(self, seq_id: int, num_tokens: int) -> None:
        self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), num_tokens)

    def free(self, seq_id: int) -> None:
        self.live.discard(seq_id)

    def rewind(self, seq_id: int, num_tokens: int) -> None:
        self.lengths[seq_id] -= num_tokens
        if self.stores_kv and num_tokens:
            self.truncate.append((self.rows[seq_id], self.lengths[seq_id]))

    def commit(self, seq_id: int, tokens: list[int], num_tokens: int) -> None:
        return None

    def locate(self, seq_id: int) -> int:
        return self.rows[seq_id]

    def take_ops(self) -> KVOps:
        ops = KVOps(truncate=self.truncate)
        self.truncate = []
        if self.new_batch:
            self.new_batch = False
            ops.new_rows = (len(self.rows), self.longest + self.slack)
        return ops

    def usage(self) -> None:
        return None
