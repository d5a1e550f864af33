"""Paged KV block allocation with automatic prefix caching, after vLLM v1's BlockPool and
KVCacheManager.

A pool of fixed-size blocks (block_size tokens each) with reference counts. A block whose
count drops to zero goes to the tail of a free queue that doubles as the LRU list of the
prefix cache: it keeps its cached content (and hash) until `allocate` pops it from the head.
A full block's hash chains its parent's hash, so equal hashes mean equal prefixes, and a new
prompt reuses every leading block already in the pool.

Only the bookkeeping lives here; the tensors (K/V pools) belong to the storage, which writes
token t of a sequence at `slot_mapping`'s slot and applies `take_copies()` (copy-on-write)
before writing. A block's hash can include extra content (`ExtraKey`: e.g. the hash of the
image that the block's placeholder tokens stand for), so equal tokens with different
content never share KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Hashable, Sequence


class OutOfBlocks(Exception):
    """Not enough free blocks: the caller can preempt a sequence and retry; nothing changed."""


class KVCacheError(RuntimeError):
    """A bookkeeping invariant was violated (double free, use of a freed block, ...): a bug."""


ExtraKey = tuple[int, int, bytes]  # token positions [start, end) stand for content `key`


def hash_block(parent: int | None, tokens: Sequence[int], extra: bytes = b"") -> int:
    """Hash of a full block given its parent's hash (and extra content its tokens stand
    for): stable across processes and machines (unlike Python's salted hash()), 128 bits so
    collisions are not a practical concern."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"root" if parent is None else parent.to_bytes(16, "little"))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if extra:
        h.update(b"extra" + extra)
    return int.from_bytes(h.digest(), "little")


def block_extra(extras: Sequence[ExtraKey], start: int, end: int) -> bytes:
    """The extra content of the block holding positions [start, end): every key whose span
    overlaps it, with the overlap (so a key spanning blocks marks each part)."""
    return b"".join(
        struct.pack("<qq", max(a, start), min(b, end)) + key
        for a, b, key in extras
        if a < end and b > start
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = [0] * num_blocks
        # Free blocks, least recently freed first. OrderedDict gives O(1) pop-head, append-tail
        # and remove-from-middle (a cache hit on a free block), like vLLM's linked list.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_of: dict[int, int] = {}  # hash -> cached block
        self.hash_of: dict[int, int] = {}  # cached block -> hash

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never used, or cached but unreferenced (evictable)."""
        return len(self.free)

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise KVCacheError(f"block {block} out of range [0, {self.num_blocks})")

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block, _ = self.free.popitem(last=False)
        h = self.hash_of.pop(block, None)
        if h is not None:  # evict: its content is about to be overwritten
            del self.block_of[h]
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Share a block that is in use (fork). Reviving a free block goes through lookup()."""
        self._check(block)
        if self.refcount[block] == 0:
            raise KVCacheError(f"incref of free block {block}: its content may be overwritten")
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        self._check(block)
        if self.refcount[block] == 0:
            raise KVCacheError(f"double free of block {block}")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free[block] = None  # tail: evicted last

    def peek(self, h: int) -> int | None:
        """The cached block for hash h, without taking a reference."""
        return self.block_of.get(h)

    def lookup(self, h: int) -> int | None:
        """A cached full block by hash; a hit takes a reference (reviving it if it was free)."""
        block = self.block_of.get(h)
        if block is not None:
            if self.refcount[block] == 0:
                del self.free[block]
            self.refcount[block] += 1
        return block

    def register(self, block: int, h: int) -> None:
        """Mark a full, written block as cached under h. If h is already cached by another
        block (the same prefix computed twice), the first one stays and this one is not cached."""
        self._check(block)
        if self.refcount[block] == 0:
            raise KVCacheError(f"register of free block {block}")
        old = self.hash_of.get(block)
        if old is not None and old != h:
            raise KVCacheError(f"block {block} is already cached under another hash")
        if h not in self.block_of:
            self.block_of[h], self.hash_of[block] = block, h

    def unregister(self, block: int) -> None:
        """Forget a block's cached hash: its content is about to change (rewind)."""
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.block_of[h]

    def check_invariants(self) -> None:
        for b, rc in enumerate(self.refcount):
            if rc < 0:
                raise KVCacheError(f"block {b} has refcount {rc}")
            if (b in self.free) == (rc > 0):
                raise KVCacheError(f"block {b}: refcount {rc} but in free queue: {b in self.free}")
        if len(self.free) != self.refcount.count(0):
            raise KVCacheError("free queue holds a block twice or an unknown block")
        if {h: b for b, h in self.hash_of.items()} != self.block_of:
            raise KVCacheError("hash maps disagree")


class BlockManager:
    """Per-sequence block tables over a pool (vLLM's KVCacheManager). A sequence's token i
    lives in block table[i // block_size] at offset i % block_size."""

    def __init__(self, pool: BlockPool, prefix_cache: bool = False) -> None:
        self.pool, self.prefix_cache = pool, prefix_cache
        self.block_size = pool.block_size
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}  # tokens with a slot reserved
        self.hashes: dict[Hashable, list[int]] = {}  # hash of each committed full block
        self.extras: dict[Hashable, tuple[ExtraKey, ...]] = {}
        # Copy-on-write (src, dst) not yet applied. The writer's reference to src moves here
        # until take_copies(), so src cannot be freed and reused before it is copied.
        self.copies: list[tuple[int, int]] = []

    def _seq(self, seq_id: Hashable) -> list[int]:
        table = self.tables.get(seq_id)
        if table is None:
            raise KVCacheError(f"unknown or freed sequence {seq_id!r}")
        return table

    def blocks_needed(self, num_tokens: int, seq_id: Hashable | None = None) -> int:
        """Free blocks needed to add num_tokens to seq_id (including a copy-on-write), or to
        hold a new sequence of num_tokens (an upper bound: prefix hits only lower it)."""
        if seq_id is None:
            return _cdiv(num_tokens, self.block_size)
        table, n = self._seq(seq_id), self.lengths[seq_id]
        new = _cdiv(n + num_tokens, self.block_size) - len(table)
        return new + self._needs_cow(table, n, num_tokens)

    def can_allocate(self, num_tokens: int, seq_id: Hashable | None = None) -> bool:
        return self.blocks_needed(num_tokens, seq_id) <= self.pool.num_free

    def _needs_cow(self, table: list[int], n: int, num_tokens: int) -> bool:
        """True when the next write lands in a partly filled block that another sequence
        uses. A pending copy's pin does not count: copies are applied before the writes."""
        if num_tokens == 0 or n % self.block_size == 0:
            return False
        last = table[-1]
        return self.pool.refcount[last] - sum(src == last for src, _ in self.copies) > 1

    def _hash(self, seq_id: Hashable, parent: int | None, tokens: list[int], i: int) -> int:
        bs, extras = self.block_size, self.extras[seq_id]
        extra = block_extra(extras, i * bs, (i + 1) * bs) if extras else b""
        return hash_block(parent, tokens[i * bs : (i + 1) * bs], extra)

    def allocate(
        self, seq_id: Hashable, tokens: list[int], extras: tuple[ExtraKey, ...] = ()
    ) -> int:
        """Reserve blocks for a new sequence's prompt, reusing cached full prefix blocks.
        Returns how many leading prompt tokens already have KV (a multiple of block_size,
        always < len(tokens) so the last token is computed and yields logits)."""
        if seq_id in self.tables:
            raise KVCacheError(f"sequence {seq_id!r} already allocated")
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        bs, pool = self.block_size, self.pool
        hits: list[int] = []  # hashes of the cached leading blocks
        self.extras[seq_id] = extras
        if self.prefix_cache:
            parent = None
            for i in range(len(tokens) // bs):
                parent = self._hash(seq_id, parent, tokens, i)
                if pool.peek(parent) is None:
                    break
                hits.append(parent)
            if len(hits) * bs == len(tokens):  # recompute the last block into a fresh one
                hits.pop()
        fresh = _cdiv(len(tokens), bs) - len(hits)
        revived = sum(pool.refcount[pool.block_of[h]] == 0 for h in hits)
        if fresh + revived > pool.num_free:  # check first: a failure must leave no trace
            del self.extras[seq_id]
            raise OutOfBlocks(f"prompt needs {fresh + revived} blocks, {pool.num_free} free")
        table = [pool.lookup(h) for h in hits]  # take the hits before allocate() can evict them
        table += [pool.allocate() for _ in range(fresh)]
        self.tables[seq_id], self.lengths[seq_id] = table, len(tokens)
        self.hashes[seq_id] = hits
        return len(hits) * bs

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> None:
        """Reserve slots for num_tokens more tokens (decode, or the next prefill chunk)."""
        table, n = self._seq(seq_id), self.lengths[seq_id]
        need = self.blocks_needed(num_tokens, seq_id)
        if need > self.pool.num_free:
            raise OutOfBlocks(f"sequence {seq_id!r} needs {need} blocks, {self.pool.num_free} free")
        if self._needs_cow(table, n, num_tokens):
            dst = self.pool.allocate()
            self.copies.append((table[-1], dst))
            table[-1] = dst
        grow = _cdiv(n + num_tokens, self.block_size) - len(table)
        table += [self.pool.allocate() for _ in range(grow)]
        self.lengths[seq_id] = n + num_tokens

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending copy-on-write block copies (src, dst): the storage must copy src's K/V into
        dst before this step's writes. Releases the references held on the sources."""
        copies, self.copies = self.copies, []
        for src, _ in copies:
            self.pool.decref(src)
        return copies

    def commit(self, seq_id: Hashable, tokens: list[int], num_tokens: int | None = None) -> None:
        """After K/V for the sequence's first num_tokens `tokens` (default all) was written:
        cache each newly full block under its chained hash, so later prompts can reuse it."""
        table, hashes = self._seq(seq_id), self.hashes[seq_id]
        n = len(tokens) if num_tokens is None else num_tokens
        if n > self.lengths[seq_id]:
            raise KVCacheError(
                f"commit of {n} tokens but only {self.lengths[seq_id]} slots reserved"
            )
        if not self.prefix_cache:
            return
        bs = self.block_size
        for i in range(len(hashes), n // bs):
            h = self._hash(seq_id, hashes[-1] if hashes else None, tokens, i)
            self.pool.register(table[i], h)
            hashes.append(h)

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """dst shares all of src's blocks (e.g. parallel sampling); writes copy on demand."""
        table = self._seq(src_id)
        if dst_id in self.tables:
            raise KVCacheError(f"sequence {dst_id!r} already allocated")
        for block in table:
            self.pool.incref(block)
        self.tables[dst_id], self.lengths[dst_id] = list(table), self.lengths[src_id]
        self.hashes[dst_id] = list(self.hashes[src_id])
        self.extras[dst_id] = self.extras[src_id]

    def rewind(self, seq_id: Hashable, num_tokens: int) -> None:
        """Drop the sequence's last num_tokens slots (a rejected speculation): blocks past the
        new end are released; a cached block that becomes partly filled loses its hash (its
        slots will be rewritten), and a shared one is copied on the next write."""
        table, n = self._seq(seq_id), self.lengths[seq_id]
        if not 0 <= num_tokens <= n:
            raise KVCacheError(f"rewind of {num_tokens} tokens from a {n}-token sequence")
        n -= num_tokens
        keep = _cdiv(n, self.block_size)
        for block in reversed(table[keep:]):
            self.pool.decref(block)
        del table[keep:]
        del self.hashes[seq_id][n // self.block_size :]
        if n % self.block_size and self.pool.refcount[table[-1]] == 1:
            self.pool.unregister(table[-1])
        self.lengths[seq_id] = n

    def detach(self, seq_id: Hashable) -> tuple[list[int], int, tuple[ExtraKey, ...]]:
        """Take the sequence out (swap-out): returns its (table, length, extras); the caller
        copies the blocks elsewhere and must `decref` them once copied."""
        table, n, extras = self._seq(seq_id), self.lengths[seq_id], self.extras[seq_id]
        del self.tables[seq_id], self.lengths[seq_id], self.hashes[seq_id], self.extras[seq_id]
        return table, n, extras

    def attach(self, seq_id: Hashable, num_tokens: int, extras: tuple[ExtraKey, ...]) -> list[int]:
        """Give a sequence fresh blocks for num_tokens (swap-in); returns its new table."""
        if seq_id in self.tables:
            raise KVCacheError(f"sequence {seq_id!r} already allocated")
        need = _cdiv(num_tokens, self.block_size)
        if need > self.pool.num_free:
            raise OutOfBlocks(f"swap-in needs {need} blocks, {self.pool.num_free} free")
        table = [self.pool.allocate() for _ in range(need)]
        self.tables[seq_id], self.lengths[seq_id] = table, num_tokens
        self.hashes[seq_id], self.extras[seq_id] = [], extras
        return table

    def free(self, seq_id: Hashable) -> None:
        """Release a finished or preempted sequence. Tail first, so the LRU evicts a request's
        last blocks before its first ones (which are the likelier shared prefix)."""
        table = self._seq(seq_id)
        for block in reversed(table):
            self.pool.decref(block)
        del self.tables[seq_id], self.lengths[seq_id], self.hashes[seq_id], self.extras[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id))

    def num_tokens(self, seq_id: Hashable) -> int:
        self._seq(seq_id)
        return self.lengths[seq_id]

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Pool slot (block * block_size + offset) of each position in [start, end)."""
        table, bs = self._seq(seq_id), self.block_size
        if not 0 <= start <= end <= self.lengths[seq_id]:
            raise KVCacheError(
                f"positions [{start}, {end}) outside the {self.lengths[seq_id]} reserved slots"
            )
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def check_invariants(self) -> None:
        """Pool invariants, plus: each block's refcount equals its uses in tables and pending
        copies, and no table holds a block twice."""
        self.pool.check_invariants()
        uses = [0] * self.pool.num_blocks
        for table in self.tables.values():
            if len(set(table)) != len(table):
                raise KVCacheError("a block table holds a block twice")
            for b in table:
                uses[b] += 1
        for src, _ in self.copies:
            uses[src] += 1
        if uses != self.pool.refcount:
            raise KVCacheError("refcounts do not match block table references")
