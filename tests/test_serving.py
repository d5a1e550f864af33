"""The engine's scheduler over paged KV: continuous batching invariants, preemption (recompute
and swap), prefix caching, int8 KV, online static batches. fp32 tiny model, so greedy outputs
must equal each request run alone."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.errors import RecipeError
from common.core.request import Request
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import Scheduler, SchedulerParams, Sequence
from common.io.checkpoint import from_seed
from common.kv.ops import KVOps
from common.kv.spec import KVSpec
from common.parallel.capacity import kv_capacity
from common.parallel.memory import kv_bytes_per_token
from models.llama import LlamaForCausalLM

CPU = Device("cpu")
ARGS = TINY_LLAMA
TOKEN_BYTES = kv_bytes_per_token(ARGS, torch.float32)
BS = 4


@functools.cache
def model() -> LlamaForCausalLM:
    return from_seed(LlamaForCausalLM, ARGS, 0, "cpu", torch.float32)


def workload(n: int = 7, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request([rng.randrange(3, 96) for _ in range(rng.randint(1, 30))], rng.randint(1, 12))
        for _ in range(n)
    ]


@functools.cache
def alone() -> list[list[int]]:
    """Each request by itself through the unoptimized path (dynamic cache, eager)."""
    eng = Engine(model(), CPU)
    return [eng.generate([r])[0].tokens for r in workload()]


def serving(spec: KVSpec, attention: str = "eager", **kw) -> Engine:
    """An engine under the scheduler; continuous batching unless kw says otherwise."""
    return Engine(model(), CPU, spec, attention, SchedulerParams(**{"kind": "continuous", **kw}))


def serve(spec: KVSpec, attention: str = "eager", **kw) -> list:
    return serving(spec, attention, **kw).generate(workload())


@pytest.mark.parametrize("attention", ["eager", "flash"])
@pytest.mark.parametrize("kind", ["static", "continuous"])
@pytest.mark.parametrize("chunk", [None, 8])
def test_outputs_equal_running_alone(attention: str, kind: str, chunk: int | None) -> None:
    outs = serve(
        KVSpec("paged", block_size=BS), attention, kind=kind, max_batch=3, max_tokens_per_step=chunk
    )
    assert [o.tokens for o in outs] == alone()
    assert all(len(o.token_times) == len(o.tokens) for o in outs)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "sjf"])
def test_outputs_do_not_depend_on_policy_or_arrival_order(policy: str) -> None:
    reqs = workload()
    for i, r in enumerate(reqs):
        r.priority = -i  # priority runs them newest first
    order = list(range(len(reqs)))
    random.Random(1).shuffle(order)
    eng = serving(KVSpec("paged", block_size=BS), policy=policy, max_batch=2)
    outs = eng.generate([reqs[i] for i in order])
    assert [o.tokens for o in outs] == [alone()[i] for i in order]


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preemption_under_a_small_budget_completes_every_request_correctly(
    preemption: str,
) -> None:
    # Short prompts, long outputs: admission fits many, growth then runs out of blocks.
    reqs = [Request([5 + i, 9, 11 + i], 24) for i in range(5)]
    ref = [Engine(model(), CPU).generate([r])[0].tokens for r in reqs]
    budget = 16 * BS * TOKEN_BYTES  # 16 blocks; 5 sequences need 7 each at the end
    spec = KVSpec("paged", block_size=BS, budget_bytes=budget)
    eng = serving(spec, max_batch=5, preemption=preemption)
    outs = eng.generate(reqs)
    assert [o.tokens for o in outs] == ref
    assert sum(o.preemptions for o in outs) > 0
    assert eng.peak_kv_bytes <= budget


def test_a_request_larger_than_the_whole_budget_is_a_clear_error() -> None:
    with pytest.raises(RecipeError, match="kv_budget"):
        serve(KVSpec("paged", block_size=BS, budget_bytes=2 * BS * TOKEN_BYTES))


class CountingKV:
    """Fake KV manager with a token budget: records the peak it ever held."""

    stores_kv = True

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held, self.peak = capacity, {}, 0

    def _set(self, seq_id: int, n: int) -> None:
        from common.kv.errors import OutOfKV

        if sum(self.held.values()) - self.held.get(seq_id, 0) + n > self.capacity:
            raise OutOfKV("full")
        self.held[seq_id] = n
        self.peak = max(self.peak, sum(self.held.values()))

    def allocate(self, seq_id: int, tokens: list[int], max_len: int, extras=()) -> int:
        self._set(seq_id, len(tokens))
        return 0

    def grow(self, seq_id: int, n: int) -> None:
        self._set(seq_id, n)

    def free(self, seq_id: int) -> None:
        del self.held[seq_id]

    def commit(self, seq_id: int, tokens: list[int], n: int) -> None:
        assert n <= self.held[seq_id]

    def locate(self, seq_id: int) -> int:
        return 0

    def take_ops(self) -> KVOps:
        return KVOps()

    def usage(self) -> None:
        return None


def step(sched: Scheduler, token: int = 2) -> list[int]:
    """One step without a model: every sequence that reaches its end samples `token`."""
    plan = sched.schedule()
    sched.update(plan, {e.seq_id: token for e in plan.seqs if e.sample}, 0.0)
    return [e.seq_id for e in plan.seqs]


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_scheduler_never_exceeds_the_budget_and_finishes_each_request_once(kind: str) -> None:
    kv = CountingKV(capacity=60)
    sched = Scheduler(kv, SchedulerParams(kind, "fcfs", max_batch=4, max_tokens_per_step=16))
    rng = random.Random(0)
    seqs = [Sequence(i, [1] * rng.randint(1, 30), rng.randint(1, 20), None) for i in range(12)]
    for s in seqs:
        sched.add(s)
    for _ in range(10_000):
        if not sched.has_work():
            break
        step(sched)
        assert kv.peak <= kv.capacity
        assert len(sched.running) <= 4
    assert all(s.finish_reason == "length" and len(s.output) == s.max_new_tokens for s in seqs)
    assert not kv.held


def test_static_waits_for_the_longest_member() -> None:
    sched = Scheduler(CountingKV(10_000), SchedulerParams("static", "fcfs", max_batch=2))
    seqs = [Sequence(i, [1, 2], new, None) for i, new in enumerate([1, 5, 1])]
    for s in seqs:
        sched.add(s)
    assert step(sched, 3) == [0, 1]
    assert seqs[0].finish_reason == "length" and seqs[1].finish_reason is None
    assert step(sched) == [1]  # request 2 waits for the batch


def test_prefix_cache_skips_cached_prefill_and_keeps_outputs() -> None:
    prefix = list(range(3, 3 + 4 * BS))
    reqs = [Request(prefix + [50 + i, 60 + i], 4) for i in range(3)]
    ref = [Engine(model(), CPU).generate([r])[0].tokens for r in reqs]
    eng = serving(KVSpec("paged", block_size=BS, prefix_cache=True), kind="static", max_batch=1)
    fed: list[int] = []
    forward = eng.runner.forward
    eng.runner.forward = lambda store, ids, *a: fed.append(ids.shape[1]) or forward(store, ids, *a)
    outs = eng.generate(reqs)
    assert [o.tokens for o in outs] == ref
    prefills = [n for n in fed if n > 1]
    assert prefills[0] == len(prefix) + 2 and prefills[1:] == [2, 2]  # later requests skip it


def test_int8_kv_halves_bytes_and_mostly_agrees() -> None:
    full = serving(KVSpec("paged", block_size=BS))
    q = serving(KVSpec("paged", block_size=BS, int8=True))
    outs = q.generate(workload())
    full.generate(workload())
    assert q.peak_kv_bytes <= 0.55 * full.peak_kv_bytes * 2  # fp32 model: int8 is ~0.28x
    agree = [a == b for o, r in zip(outs, alone()) for a, b in zip(o.tokens, r)]
    assert sum(agree) / len(agree) >= 0.8


def test_contiguous_int8_matches_paged_int8() -> None:
    reqs = workload()[:3]
    a = Engine(model(), CPU, KVSpec("contiguous", int8=True)).generate(reqs)
    b = serving(KVSpec("paged", int8=True, block_size=BS), kind="static", max_batch=3).generate(
        reqs
    )
    assert [x.tokens for x in a] == [x.tokens for x in b]


@pytest.mark.parametrize("kw", [{}, {"kind": "static", "max_tokens_per_step": 8}])
def test_cont_batch_needs_paged_kv(kw: dict) -> None:
    with pytest.raises(RecipeError, match="paged"):
        serving(KVSpec("contiguous"), **kw)


def test_contiguous_max_len_reserves_max_length_slots() -> None:
    """Max-length allocation: same outputs, every row reserves max_len slots, so most of
    them hold no token; a batch that needs more slots than max_len is a clear error."""
    reqs = workload()[:3]
    tight = Engine(model(), CPU, KVSpec("contiguous"))
    fixed = Engine(model(), CPU, KVSpec("contiguous", max_len=90))
    assert [c.tokens for c in fixed.generate(reqs)] == [c.tokens for c in tight.generate(reqs)]
    tight.generate(reqs)
    assert fixed.peak_kv_bytes == 3 * 90 * TOKEN_BYTES > tight.peak_kv_bytes
    used = fixed.stats["kv_used_byte_steps"] / fixed.stats["kv_reserved_byte_steps"]
    assert used < tight.stats["kv_used_byte_steps"] / tight.stats["kv_reserved_byte_steps"]
    with pytest.raises(RecipeError, match="kv_cache.max_len is 10"):
        Engine(model(), CPU, KVSpec("contiguous", max_len=10)).generate(reqs)


def test_kv_capacity_contiguous_max_len_vs_paged() -> None:
    cap = kv_capacity([16, 32], 100, BS, batch=2, max_len=64)
    assert cap.budget_bytes == 2 * 64 * 100
    assert cap.contiguous == 2
    # 128 slots = 32 blocks; sequences take 4, 8, 4, 8, ... blocks: 5 fit (28 blocks)
    assert cap.paged == 5


def test_plan_is_plain_data_with_chunks_within_the_budget() -> None:
    """The scheduler's plan: no tensors; prefill chunks fill the token budget, a decode is
    one token, and only a step that reaches a sequence's end samples."""
    from dataclasses import fields

    from common.kv.manager import PagedKVManager

    kv = PagedKVManager(64, BS)
    sched = Scheduler(kv, SchedulerParams("continuous", max_batch=4, max_tokens_per_step=8))
    for i, n in enumerate([13, 3]):
        sched.add(Sequence(i, list(range(1, n + 1)), 2, None))
    plans = []
    while sched.has_work():
        plan = sched.schedule()
        plans.append([(e.seq_id, e.start, len(e.tokens), e.sample) for e in plan.seqs])
        for e in plan.seqs:
            assert not any(isinstance(getattr(e, f.name), torch.Tensor) for f in fields(e))
            assert e.where == kv.locate(e.seq_id)
        sched.update(plan, {e.seq_id: 7 for e in plan.seqs if e.sample}, 0.0)
    assert plans[:3] == [
        [(0, 0, 8, False)],
        [(0, 8, 5, True), (1, 0, 3, True)],
        [(0, 13, 1, True), (1, 3, 1, True)],
    ]
