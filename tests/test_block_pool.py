"""Block pool / block manager: allocation, LRU prefix cache, copy-on-write, invariants."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.kv.block_pool import BlockManager, BlockPool, KVCacheError, OutOfBlocks, hash_block

ROOT = Path(__file__).resolve().parents[1]


def snapshot(m: BlockManager) -> tuple:
    p = m.pool
    return (
        {k: list(v) for k, v in m.tables.items()},
        dict(m.lengths),
        {k: list(v) for k, v in m.hashes.items()},
        list(m.copies),
        list(p.refcount),
        list(p.free),
        dict(p.block_of),
    )


def test_hash_is_stable_across_processes_and_chained():
    code = "from common.kv.block_pool import hash_block; print(hash_block(hash_block(None, [1, 2]), [3]))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert int(out.stdout) == hash_block(hash_block(None, [1, 2]), [3])
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [3]) != hash_block(hash_block(None, [1, 2]), [3])


def test_allocate_pops_least_recently_freed_and_runs_out():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    with pytest.raises(OutOfBlocks):
        pool.allocate()
    for x in (b, c, a):
        pool.decref(x)
    assert [pool.allocate() for _ in range(3)] == [b, c, a]
    pool.check_invariants()


def test_cached_free_block_is_evicted_on_reuse_and_revived_by_lookup():
    pool = BlockPool(2, 4)
    a = pool.allocate()
    pool.register(a, 123)
    pool.decref(a)
    assert pool.num_free == 2 and pool.peek(123) == a
    assert pool.lookup(123) == a and pool.refcount[a] == 1 and pool.num_free == 1
    pool.decref(a)
    pool.allocate()  # the never-used block goes first: it was freed earlier (at start)
    assert pool.peek(123) == a
    assert pool.allocate() == a and pool.peek(123) is None  # evicted when handed out
    pool.check_invariants()


def test_invariant_violations_raise():
    pool = BlockPool(2, 4)
    m = BlockManager(pool)
    m.allocate("s", [1, 2, 3])
    block = m.block_table("s")[0]
    with pytest.raises(KVCacheError, match="free block"):
        pool.incref(1 - block)  # reviving a freed block behind the cache's back
    with pytest.raises(KVCacheError, match="free block"):
        pool.register(1 - block, 7)
    pool.decref(block)  # bug: frees a block the sequence still references
    with pytest.raises(KVCacheError, match="refcounts"):
        m.check_invariants()
    with pytest.raises(KVCacheError, match="double free"):
        m.free("s")
    m = BlockManager(BlockPool(2, 4))
    m.allocate("s", [1, 2, 3])
    m.free("s")
    with pytest.raises(KVCacheError, match="unknown"):
        m.slot_mapping("s", 0, 1)  # reading a freed sequence's blocks


def test_manager_errors():
    m = BlockManager(BlockPool(4, 4))
    m.allocate("a", [1, 2])
    with pytest.raises(KVCacheError, match="already"):
        m.allocate("a", [1])
    with pytest.raises(KVCacheError, match="already"):
        m.fork("a", "a")
    with pytest.raises(KVCacheError, match="slots reserved"):
        m.commit("a", [1, 2, 3])
    with pytest.raises(KVCacheError, match="outside"):
        m.slot_mapping("a", 0, 3)
    with pytest.raises(ValueError):
        m.allocate("b", [])
    m.free("a")
    with pytest.raises(KVCacheError, match="unknown"):
        m.free("a")


def test_slot_mapping_append_and_budget():
    m = BlockManager(BlockPool(4, 4))
    assert m.blocks_needed(5) == 2 and m.can_allocate(16) and not m.can_allocate(17)
    m.allocate("a", list(range(5)))
    t = m.block_table("a")
    assert m.slot_mapping("a", 3, 5) == [t[0] * 4 + 3, t[1] * 4]
    assert m.blocks_needed(3, "a") == 0 and m.blocks_needed(4, "a") == 1
    m.append("a", 4)
    assert m.num_tokens("a") == 9 and len(m.block_table("a")) == 3
    assert m.slot_mapping("a", 8, 9) == [m.block_table("a")[2] * 4]


def test_prefix_hit_reuses_blocks_and_recomputes_last_token():
    m = BlockManager(BlockPool(8, 4), prefix_cache=True)
    prompt = list(range(10))
    assert m.allocate("a", prompt) == 0
    m.commit("a", prompt)
    a = m.block_table("a")
    assert m.allocate("b", prompt[:8] + [99]) == 8  # two full blocks hit
    assert m.block_table("b")[:2] == a[:2] and m.block_table("b")[2] != a[2]
    m.free("a")
    m.free("b")
    assert m.allocate("c", prompt[:8]) == 4  # all blocks hit: last one recomputed
    c = m.block_table("c")
    assert c[0] == a[0] and c[1] not in a[:2]
    m.commit("c", prompt[:8])  # same hash as a[1]: the first cached copy stays
    assert m.pool.peek(m.hashes["c"][1]) == a[1]
    m.check_invariants()


def test_eviction_is_lru_and_tail_first():
    m = BlockManager(BlockPool(5, 2), prefix_cache=True)
    prompt = [1, 2, 3, 4, 5, 6]
    m.allocate("a", prompt)
    m.commit("a", prompt)
    head, mid, tail = m.block_table("a")
    hashes = list(m.hashes["a"])
    m.free("a")  # all three stay cached; the tail is freed first, so it is evicted first
    assert list(m.pool.free) == [3, 4, tail, mid, head]
    m.allocate("b", [9] * 5)  # 3 blocks: the two never used, then the oldest freed
    assert m.block_table("b") == [3, 4, tail]
    assert m.pool.peek(hashes[2]) is None and m.pool.peek(hashes[1]) == mid
    assert m.allocate("c", prompt[:4]) == 2  # head still cached (mid recomputed: last block)
    assert m.block_table("c")[0] == head


def test_out_of_blocks_leaves_no_trace():
    m = BlockManager(BlockPool(4, 2), prefix_cache=True)
    m.allocate("a", [1, 2, 3, 4])
    m.commit("a", [1, 2, 3, 4])
    m.free("a")
    m.allocate("b", [5, 6, 7])
    before = snapshot(m)
    with pytest.raises(OutOfBlocks):
        m.allocate("c", [1, 2, 3, 4, 8, 8, 8])  # would revive 2 cached blocks + 2 fresh
    with pytest.raises(OutOfBlocks):
        m.append("b", 6)
    assert snapshot(m) == before


def test_fork_copy_on_write():
    m = BlockManager(BlockPool(6, 4))
    m.allocate("a", [1, 2, 3, 4, 5])
    m.fork("a", "b")
    shared = m.block_table("a")
    assert m.blocks_needed(1, "b") == 1
    m.append("b", 1)  # the partial last block is shared: b gets a private copy
    ((src, dst),) = m.copies
    assert src == shared[1] and m.block_table("b") == [shared[0], dst]
    m.append("a", 1)  # a's last block is no longer shared after b moved away
    assert m.block_table("a") == shared and len(m.copies) == 1
    m.check_invariants()
    assert m.take_copies() == [(src, dst)] and m.take_copies() == []
    m.check_invariants()
    m.free("a")
    m.free("b")
    assert m.pool.num_free == 6


def test_pending_copy_source_survives_free():
    m = BlockManager(BlockPool(3, 4))
    m.allocate("a", [1, 2])
    m.fork("a", "b")
    m.append("b", 1)
    m.free("a")  # the copy source is still pinned by the pending copy
    src, dst = m.copies[0]
    assert m.pool.refcount[src] == 1
    m.take_copies()
    assert m.pool.refcount[src] == 0
    m.check_invariants()


class BlockMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/commit/free against a shadow KV store: every slot holds
    the token whose K/V was written there."""

    BS = 2

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(BlockPool(10, self.BS), prefix_cache=True)
        self.shadow: dict[int, int] = {}  # slot -> token written there
        self.tokens: dict[int, list[int]] = {}  # live sequence -> its tokens
        self.freed: list[int] = []
        self.content: dict[int, tuple[int | None, list[int]]] = {}  # hash -> (parent, tokens)
        self.next_id = 0

    def write(self, seq: int, start: int) -> None:
        """The storage's step: apply copy-on-write, write new tokens' K/V, then commit."""
        bs = self.BS
        for src, dst in self.m.take_copies():
            for o in range(bs):
                if src * bs + o in self.shadow:
                    self.shadow[dst * bs + o] = self.shadow[src * bs + o]
        toks = self.tokens[seq]
        for p, slot in zip(range(start, len(toks)), self.m.slot_mapping(seq, start, len(toks))):
            block = slot // bs
            assert self.m.pool.refcount[block] == 1, "wrote into a shared block"
            assert block not in self.m.pool.hash_of, "wrote into a cached block"
            self.shadow[slot] = toks[p]
        self.m.commit(seq, toks)
        parent = None
        for i in range(len(toks) // bs):
            h = hash_block(parent, toks[i * bs : (i + 1) * bs])
            self.content[h] = (parent, toks[i * bs : (i + 1) * bs])
            parent = h

    @rule(prompt=st.lists(st.integers(0, 1), min_size=1, max_size=9))
    def new(self, prompt):
        seq, self.next_id = self.next_id, self.next_id + 1
        parent, cached = None, []
        for i in range(len(prompt) // self.BS):
            parent = hash_block(parent, prompt[i * self.BS : (i + 1) * self.BS])
            if self.m.pool.peek(parent) is None:
                break
            cached.append(self.m.pool.peek(parent))
        cached = cached[: (len(prompt) - 1) // self.BS]
        before = snapshot(self.m)
        try:
            hit = self.m.allocate(seq, prompt)
        except OutOfBlocks:
            assert snapshot(self.m) == before
            return
        assert hit == len(cached) * self.BS and self.m.block_table(seq)[: len(cached)] == cached
        self.tokens[seq] = list(prompt)
        self.write(seq, hit)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 3))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        before = snapshot(self.m)
        try:
            self.m.append(seq, n)
        except OutOfBlocks:
            assert snapshot(self.m) == before
            return
        start = len(self.tokens[seq])
        self.tokens[seq] += data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        self.write(seq, start)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        dst, self.next_id = self.next_id, self.next_id + 1
        self.m.fork(src, dst)
        self.tokens[dst] = list(self.tokens[src])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(seq)
        del self.tokens[seq]
        self.freed.append(seq)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data):
        with pytest.raises(KVCacheError):
            self.m.free(data.draw(st.sampled_from(self.freed)))

    @invariant()
    def consistent(self):
        self.m.check_invariants()
        assert min(self.m.pool.refcount) >= 0

    @invariant()
    def every_live_token_reads_back(self):
        for seq, toks in self.tokens.items():
            slots = self.m.slot_mapping(seq, 0, len(toks))
            assert [self.shadow[s] for s in slots] == toks

    @invariant()
    def cached_blocks_match_their_hash(self):
        bs = self.BS
        for block, h in self.m.pool.hash_of.items():
            parent, toks = self.content[h]
            assert [self.shadow[block * bs + o] for o in range(bs)] == toks
            assert hash_block(parent, toks) == h

    def teardown(self):
        for seq in list(self.tokens):
            self.m.free(seq)
        self.m.take_copies()
        assert self.m.pool.num_free == self.m.pool.num_blocks  # no leak
        self.m.check_invariants()


BlockMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockMachine = BlockMachine.TestCase
