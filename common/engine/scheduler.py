"""Iteration-level scheduling (Orca / vLLM): which sequences run in the next engine step.

Each step the scheduler first gives every running sequence the KV room for its next
tokens (preempting the newest running sequence when KV runs out: its KV is dropped and it
is recomputed later), then admits waiting sequences by policy while the batch, the token
budget and the KV budget allow. `static` admits a whole batch only when the previous one
has finished: the baseline that waits for its longest member.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from common.core.errors import RecipeError
from common.core.request import SamplingParams
from common.kv.errors import OutOfKV

POLICIES = ("fcfs", "priority", "sjf")
KINDS = ("static", "continuous")


class KVSlots(Protocol):
    """KV storage that tracks sequences (paged blocks or contiguous slots)."""

    def admit(self, seq_id: int, tokens: list[int]) -> int:
        """Reserve room for a new sequence; returns how many leading tokens are cached."""

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make room for the sequence to hold num_tokens in total."""

    def release(self, seq_id: int) -> None: ...


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    ignore_eos: bool = False
    priority: int = 0  # lower runs first under the `priority` policy
    arrival: float = 0.0
    output: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is stored
    preemptions: int = 0
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.prompt) + len(self.output) - self.num_computed


@dataclass
class Work:
    seq: Sequence
    num_tokens: int  # fed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence: a token is sampled."""
        return self.num_tokens == self.seq.num_pending


class Scheduler:
    def __init__(
        self,
        kv: KVSlots,
        kind: str = "continuous",
        policy: str = "fcfs",
        max_batch: int = 8,
        max_tokens_per_step: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise RecipeError(f"unknown scheduler.kind {kind!r}; choose one of {', '.join(KINDS)}")
        if policy not in POLICIES:
            raise RecipeError(
                f"unknown scheduler.policy {policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if max_batch <= 0 or (max_tokens_per_step is not None and max_tokens_per_step <= 0):
            raise RecipeError("scheduler.max_batch and scheduler.max_tokens_per_step must be > 0")
        self.kv, self.kind, self.policy = kv, kind, policy
        self.max_batch, self.max_tokens = max_batch, max_tokens_per_step
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._order = itertools.count()
        self._rank: dict[int, int] = {}  # arrival order, the tie-breaker of every policy

    def add(self, seq: Sequence) -> None:
        self._rank.setdefault(seq.id, next(self._order))
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _key(self, seq: Sequence) -> tuple:
        rank = self._rank[seq.id]
        if self.policy == "priority":
            return (seq.priority, rank)
        if self.policy == "sjf":
            return (len(seq.prompt) + seq.max_new_tokens, rank)
        return (rank,)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop its KV; it returns to waiting with its output kept."""
        self.kv.release(seq.id)
        self.running.remove(seq)
        seq.num_computed, seq.preemptions = 0, seq.preemptions + 1
        self.waiting.append(seq)

    def schedule(self) -> list[Work]:
        budget = self.max_tokens or 1 << 62
        work: list[Work] = []
        for seq in list(self.running):  # oldest first keeps its room
            if seq not in self.running:  # preempted below by an older sequence
                continue
            n = min(seq.num_pending, budget)
            if n <= 0:
                break
            while True:
                try:
                    self.kv.grow(seq.id, seq.num_computed + n)
                    break
                except OutOfKV:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq in self.running:
                work.append(Work(seq, n))
                budget -= n
        if self.kind == "static" and self.running:
            return work
        self.waiting.sort(key=self._key)
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            try:
                cached = self.kv.admit(seq.id, seq.tokens)
            except OutOfKV:
                if not self.running and not work:
                    raise RecipeError(
                        f"request {seq.id} needs more KV than the whole budget holds "
                        f"({len(seq.tokens)} tokens); raise scheduler.kv_budget"
                    ) from None
                break
            self.waiting.pop(0)
            self.running.append(seq)
            seq.num_computed = cached
            n = min(seq.num_pending, budget)
            work.append(Work(seq, n))
            budget -= n
        return work

    def retire(self, seq: Sequence) -> None:
        self.kv.release(seq.id)
        self.running.remove(seq)
