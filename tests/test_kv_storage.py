"""KV manager + storage through the model runner: head-sharded storage, fork (copy-on-write),
rewind, and prefix keys with extra content. fp32 tiny model, so logits must match runs that
never forked, never rewound, or ran alone."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny import TINY_LLAMA

from common.attention.paged import paged_attention_reference
from common.core.request import Request, SamplingParams
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.plan import ScheduledSeq, StepPlan
from common.engine.runner import ModelRunner
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from common.kv.block_pool import block_extra, hash_block
from common.kv.manager import PagedKVManager
from common.kv.ops import KVOps
from common.kv.paged import PagedStorage
from common.kv.spec import KVSpec
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
ARGS = TINY_LLAMA
BS = 4
PROMPT = [5, 17, 33, 8, 61, 22]  # 1.5 blocks: the second block is shared, partly filled


@functools.cache
def model() -> LlamaForCausalLM:
    return from_seed(LlamaForCausalLM, ARGS, 0, "cpu", torch.float32)


class Paged:
    """A KV manager and a runner over one pool, driven step by step as a scheduler would."""

    def __init__(self, num_blocks: int = 16, prefix_cache: bool = False) -> None:
        self.kv = PagedKVManager(num_blocks, BS, prefix_cache)
        self.runner = ModelRunner(model(), CPU, KVSpec("paged", block_size=BS), "eager")
        self.runner.storage = self.runner.new_paged(num_blocks)
        self.tokens: dict[int, list[int]] = {}

    def step(self, feeds: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its next tokens (allocating new ones); their last logits."""
        entries = []
        for seq_id, new in feeds.items():
            if seq_id not in self.tokens:
                self.tokens[seq_id] = []
                self.kv.allocate(seq_id, new, 64)
            seq = self.tokens[seq_id]
            start = len(seq)
            seq += new
            self.kv.grow(seq_id, len(seq))
            entries.append(ScheduledSeq(seq_id, start, new, True, False, seq, SamplingParams(), []))
        for e in entries:  # tables after every grow: a later copy-on-write moves a block
            e.where = self.kv.locate(e.seq_id)
        sampled, logits = self.runner.run(StepPlan(entries, self.kv.take_ops(), len(entries)))
        for seq_id, seq in self.tokens.items():
            if seq_id in feeds:
                self.kv.commit(seq_id, seq, len(seq))
        return {e.seq_id: row for e, row in zip(sampled, logits)}


def alone(tokens: list[int]) -> torch.Tensor:
    """The last-position logits of `tokens` computed in one prefill, nothing shared."""
    return Paged().step({0: tokens})[0]


@torch.inference_mode()
def test_fork_then_diverge_equals_two_independent_runs() -> None:
    p = Paged()
    p.step({0: list(PROMPT)})
    p.kv.fork(0, 1)
    p.tokens[1] = list(p.tokens[0])
    continuations = {0: [40, 3, 12], 1: [77, 70, 44]}
    for i in range(3):
        got = p.step({s: [c[i]] for s, c in continuations.items()})
        for s, c in continuations.items():
            torch.testing.assert_close(got[s], alone(PROMPT + c[: i + 1]), rtol=0, atol=1e-5)
    p.kv.blocks.check_invariants()
    shared = set(p.kv.locate(0)) & set(p.kv.locate(1))
    assert shared == {p.kv.locate(0)[0]}  # the full first block stays shared; the rest copied


@torch.inference_mode()
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_rewind_then_reappend_equals_never_appending(prefix_cache: bool) -> None:
    p = Paged(prefix_cache=prefix_cache)
    prompt = PROMPT + [9, 88]  # two full blocks, cached under their hashes
    p.step({0: prompt})
    p.step({0: [40, 3, 12]})  # a 3-token speculation (positions 8..10)
    p.kv.rewind(0, 5)  # reject it and the last prompt block's 2 tokens: back to 6 tokens
    del p.tokens[0][-5:]
    got = p.step({0: [70, 44]})[0]
    torch.testing.assert_close(got, alone(PROMPT + [70, 44]), rtol=0, atol=1e-5)
    p.kv.blocks.check_invariants()
    if prefix_cache:  # the rewritten block no longer answers for the old prompt's prefix
        first = hash_block(None, prompt[:BS])
        assert p.kv.blocks.pool.peek(hash_block(first, prompt[BS:])) is None


@pytest.mark.parametrize("int8", [False, True])
def test_two_half_head_storages_equal_one_full_storage(int8: bool) -> None:
    g = torch.Generator().manual_seed(0)
    heads, d, blocks = 4, 8, 6
    full = PagedStorage(1, (0, heads), d, blocks, BS, torch.float32, torch.device("cpu"), int8)
    halves = [
        PagedStorage(1, h, d, blocks, BS, torch.float32, torch.device("cpu"), int8)
        for h in ((0, 2), (2, 4))
    ]
    k, v = (torch.randn(2, heads, 5, d, generator=g) for _ in range(2))
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    positions = torch.arange(5).expand(2, 5)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    slots = torch.tensor([0, 1, 2, 3, 4, 8, 9, 10])
    seq_lens = torch.tensor([5, 3])
    meta = full.begin(positions, valid, tables, slots, seq_lens)
    k_full, v_full = full.update(0, k, v)
    q = torch.randn(2, 8, 5, d, generator=g)  # 8 query heads: 2 per KV head
    want = paged_attention_reference(q, k_full, v_full, tables, positions, seq_lens)
    for (h0, h1), s in zip(((0, 2), (2, 4)), halves):
        s.begin(positions, valid, tables, slots, seq_lens)
        k_half, v_half = s.update(0, k[:, h0:h1], v[:, h0:h1])
        for part, whole in zip(
            (*k_half, *v_half) if int8 else (k_half, v_half),
            (*k_full, *v_full) if int8 else (k_full, v_full),
        ):
            assert torch.equal(part, whole[:, :, h0:h1])
        got = paged_attention_reference(
            q[:, 2 * h0 : 2 * h1], k_half, v_half, tables, positions, seq_lens
        )
        torch.testing.assert_close(got, want[:, 2 * h0 : 2 * h1], rtol=0, atol=0)
    assert meta.paged is not None


def test_swap_out_and_in_restores_the_blocks() -> None:
    s = PagedStorage(2, (0, 2), 8, 4, BS, torch.float32, torch.device("cpu"), True)
    for store in s.k + s.v:
        for t in store:
            t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
    before = [[t[BS : 2 * BS].clone() for t in store] for store in s.k + s.v]
    s.apply(KVOps(swap_out=[(1, 7)]))
    for store in s.k + s.v:
        for t in store:
            t.zero_()
    s.apply(KVOps(swap_in=[(7, 3)]))
    after = [[t[3 * BS : 4 * BS] for t in store] for store in s.k + s.v]
    assert all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))
    assert not s.host


def test_block_extra_marks_only_the_blocks_it_spans() -> None:
    extras = ((2, 6, b"img-a"),)
    assert block_extra(extras, 0, 4) and block_extra(extras, 4, 8)
    assert block_extra(extras, 8, 12) == b""
    assert block_extra(extras, 0, 4) != block_extra(((2, 6, b"img-b"),), 0, 4)
    assert hash_block(None, [1, 2, 3, 4], b"a") != hash_block(None, [1, 2, 3, 4], b"b")
    assert hash_block(None, [1, 2, 3, 4]) == hash_block(None, [1, 2, 3, 4], b"")


@pytest.mark.parametrize("same_image", [True, False])
def test_prefix_keys_with_extra_content_share_kv_only_when_equal(same_image: bool) -> None:
    """Two prompts with the same placeholder tokens standing for images: equal image hashes
    reuse the cached blocks, different ones recompute everything."""
    prompt = list(range(3, 3 + 3 * BS)) + [50, 60]
    image = (1, 2 * BS, b"image-1")
    other = image if same_image else (1, 2 * BS, b"image-2")
    reqs = [Request(prompt, 3, extra_keys=(image,)), Request(prompt, 3, extra_keys=(other,))]
    spec = KVSpec("paged", block_size=BS, prefix_cache=True)
    eng = Engine(model(), CPU, spec, "eager", SchedulerParams("static", max_batch=1))
    fed: list[int] = []
    forward = eng.runner.forward
    eng.runner.forward = lambda store, ids, *a: fed.append(ids.shape[1]) or forward(store, ids, *a)
    eng.generate(reqs)
    prefills = [n for n in fed if n > 1]
    assert prefills[0] == len(prompt)
    assert prefills[1] == (len(prompt) - 3 * BS if same_image else len(prompt))
