"""Iteration-level scheduling (Orca / vLLM v1): which sequences run in the next step and
how many tokens each computes, emitted as a StepPlan (plain data; never tensors).

Each step the scheduler first gives every running sequence the KV room for its next tokens
(preempting the newest running sequence when KV runs out: by recompute, its KV is dropped
and it is prefilled again later; by swap, its blocks go to host memory and come back when
there is room), swaps preempted sequences back in, then admits waiting sequences by policy
while the batch, the token budget and the KV budget allow. `static` admits a whole batch
only when the previous one has finished: the baseline that waits for its longest member.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.core.errors import RecipeError
from common.core.request import Request, SamplingParams
from common.engine.plan import ScheduledSeq, StepPlan
from common.engine.stop import StopRule
from common.kv.errors import OutOfKV
from common.kv.manager import KVManager

POLICIES = ("fcfs", "priority", "sjf")
KINDS = ("static", "continuous")
PREEMPTIONS = ("recompute", "swap")


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding as the scheduler sees it: propose(seq id, tokens, k, final
    length, sampling) -> up to k draft tokens, asked for each decoding sequence while at
    most max_batch sequences run."""

    k: int
    propose: Callable[[int, list[int], int, int, SamplingParams], list[int]]
    max_batch: int | None = None


@dataclass(frozen=True)
class SchedulerParams:
    """How the scheduler batches (built from the `scheduler:` config group, whose schema is
    common.core.config.SchedulerConfig)."""

    kind: str = "static"
    policy: str = "fcfs"
    max_batch: int | None = None  # None: every request of a call in one batch
    max_tokens_per_step: int | None = None  # chunked prefill (paged KV)
    preemption: str = "recompute"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("kind", self.kind, KINDS),
            ("policy", self.policy, POLICIES),
            ("preemption", self.preemption, PREEMPTIONS),
        ):
            if value not in choices:
                raise RecipeError(
                    f"unknown scheduler.{name} {value!r}; choose one of {', '.join(choices)}"
                )
        if (self.max_batch is not None and self.max_batch <= 0) or (
            self.max_tokens_per_step is not None and self.max_tokens_per_step <= 0
        ):
            raise RecipeError("scheduler.max_batch and scheduler.max_tokens_per_step must be > 0")


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    max_new_tokens: int  # the budget: the request's, lowered to the model's positions
    sampling: SamplingParams | None
    request: Request | None = None  # stop rule inputs, prefix keys (default: a plain one)
    priority: int = 0  # lower runs first under the `priority` policy
    arrival: float = 0.0
    extras: Any = None  # the runner's per-sequence extra inputs (encoded content), opaque here
    tokens: list[int] = field(init=False)  # prompt + output, one list (no copy per step)
    token_times: list[float] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is stored
    preemptions: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        if self.request is None:
            self.request = Request(self.prompt, self.max_new_tokens)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.tokens) - self.num_computed


class Scheduler:
    def __init__(
        self,
        kv: KVManager,
        config: SchedulerParams,
        stop: StopRule | None = None,
        spec: Speculation | None = None,
    ) -> None:
        if config.max_batch is None:
            raise RecipeError("the scheduler needs scheduler.max_batch")
        self.kv, self.config, self.stop, self.spec = kv, config, stop or StopRule(()), spec
        self.max_batch = config.max_batch
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.swapped: list[Sequence] = []  # preempted by swap, oldest first
        self._order = itertools.count()
        self._rank: dict[int, int] = {}  # arrival order, the tie-breaker of every policy
        self._preempted_now: set[int] = set()  # in the step being scheduled

    def add(self, seq: Sequence) -> None:
        self._rank.setdefault(seq.id, next(self._order))
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _key(self, seq: Sequence) -> tuple:
        rank = self._rank[seq.id]
        if self.config.policy == "priority":
            return (seq.priority, rank)
        if self.config.policy == "sjf":
            return (len(seq.prompt) + seq.max_new_tokens, rank)
        return (rank,)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._preempted_now.add(seq.id)
        seq.preemptions += 1
        if self.config.preemption == "swap":
            self.kv.swap_out(seq.id)
            self.swapped.append(seq)
        else:  # recompute: drop its KV; it returns to waiting with its output kept
            self.kv.free(seq.id)
            seq.num_computed = 0
            self.waiting.append(seq)

    def _room(self, seq: Sequence, n: int) -> bool:
        """Grow seq's KV for n more tokens, preempting the newest running sequences as
        needed; False when seq itself was preempted."""
        while True:
            try:
                self.kv.grow(seq.id, seq.num_computed + n)
                return True
            except OutOfKV:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False

    def _entry(self, seq: Sequence, n: int, draft: list[int] = ()) -> ScheduledSeq:
        start = seq.num_computed
        return ScheduledSeq(
            seq.id,
            start,
            seq.tokens[start : start + n] + list(draft),
            n == seq.num_pending,
            len(seq.tokens) > len(seq.prompt),
            seq.tokens,
            seq.sampling,
            self.kv.locate(seq.id),
            seq.extras,
            num_draft=len(draft),
        )

    def _drafts(self) -> dict[int, list[int]]:
        """Proposals for the decoding sequences (one token pending), each at most the
        tokens its budget still allows after the step's own token; none under load."""
        spec = self.spec
        if spec is None or (spec.max_batch is not None and len(self.running) > spec.max_batch):
            return {}
        drafts = {}
        for seq in self.running:
            final = len(seq.prompt) + seq.max_new_tokens
            k = min(spec.k, final - len(seq.tokens) - 1)
            if seq.num_pending == 1 and k > 0:
                drafts[seq.id] = spec.propose(seq.id, seq.tokens, k, final, seq.sampling)[:k]
        return drafts

    def schedule(self) -> StepPlan:
        budget = self.config.max_tokens_per_step or 1 << 62
        chosen: list[tuple[Sequence, int, list[int]]] = []
        self._preempted_now.clear()
        drafts = self._drafts()
        for seq in list(self.running):  # oldest first keeps its room
            if seq not in self.running:  # preempted below by an older sequence
                continue
            n = min(seq.num_pending, budget)
            if n <= 0:
                break
            draft = drafts.get(seq.id, [])[: budget - n]
            if self._room(seq, n + len(draft)):
                chosen.append((seq, n, draft))
                budget -= n + len(draft)
        while self.swapped and len(self.running) < self.max_batch and budget > 0:
            seq = self.swapped[0]
            if seq.id in self._preempted_now and (self.running or chosen):
                break  # it just went out for lack of room: wait for the next step
            n = min(seq.num_pending, budget)
            try:
                self.kv.swap_in(seq.id, seq.num_computed + n)
            except OutOfKV:
                self._no_room(seq, chosen)
                break
            self.swapped.pop(0)
            self.running.append(seq)
            chosen.append((seq, n, []))
            budget -= n
        if not (self.config.kind == "static" and (self.running or self.swapped)):
            self._admit(chosen, budget)
        return StepPlan([self._entry(*c) for c in chosen], self.kv.take_ops(), self.max_batch)

    def _admit(self, chosen: list[tuple[Sequence, int, list[int]]], budget: int) -> None:
        self.waiting.sort(key=self._key)
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            final = len(seq.prompt) + seq.max_new_tokens
            try:
                cached = self.kv.allocate(seq.id, seq.tokens, final, seq.request.extra_keys)
            except OutOfKV:
                self._no_room(seq, chosen)
                break
            self.waiting.pop(0)
            self.running.append(seq)
            seq.num_computed = cached
            n = min(seq.num_pending, budget)
            chosen.append((seq, n, []))
            budget -= n

    def _no_room(self, seq: Sequence, chosen: list) -> None:
        """No room for seq: fine while others run (they free KV), an error when none does."""
        if not self.running and not chosen:
            raise RecipeError(
                f"request {seq.id} needs more KV than the whole budget holds "
                f"({len(seq.tokens)} tokens); raise scheduler.kv_budget"
            )

    def update(self, plan: StepPlan, sampled: dict[int, int | list[int]], now: float) -> None:
        """After the runner ran `plan`: advance each sequence, append its sampled token(s)
        (sampled: seq id -> token, or a speculation's accepted drafts and the target's
        token), rewind the KV of rejected drafts, and retire the finished ones."""
        by_id = {s.id: s for s in self.running}
        for entry in plan.seqs:
            seq = by_id[entry.seq_id]
            got = sampled.get(seq.id)
            new = [] if got is None else [got] if isinstance(got, int) else got
            rejected = entry.num_draft - max(0, len(new) - 1)
            computed = entry.start + len(entry.tokens) - rejected
            seq.num_computed = computed if self.kv.stores_kv else 0
            if rejected and self.kv.stores_kv:
                self.kv.rewind(seq.id, rejected)
            for token in new:
                seq.tokens.append(token)
                seq.token_times.append(now - seq.arrival)
                num_new = len(seq.tokens) - len(seq.prompt)
                seq.finish_reason = self.stop.check(
                    seq.request, seq.tokens, num_new, seq.max_new_tokens
                )
                if seq.finish_reason:
                    break
            # KV of the tokens before the last is written (prefix caches index it)
            self.kv.commit(seq.id, seq.tokens, min(seq.num_computed, len(seq.tokens) - 1))
            if seq.finish_reason:
                self.retire(seq)

    def retire(self, seq: Sequence) -> None:
        self.kv.free(seq.id)
        self.running.remove(seq)
