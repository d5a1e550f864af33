"""Runners: how a variant turns a group of requests into completions (our engine or a peer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from common.bench.workload import batches
from common.core.request import Completion, Request
from common.engine.engine import Engine


@dataclass
class Runner:
    """A variant: how to run one group of requests (a static batch, or everything at once
    under a scheduler), teacher-force a continuation, and report KV bytes at the peak."""

    generate: Callable[[list[Request]], list[Completion]]
    teacher_forced_logits: Callable[[list[int], list[int]], Tensor]
    peak_kv: Callable[[], int]  # reserved KV bytes at the fullest moment
    groups: Callable[[list[Request]], list[list[Request]]]
    stats: Callable[[], dict] = dict  # engine counters since the last reset (decode steps, ...)
    reset: Callable[[], None] = lambda: None


def static_online(
    engine: Engine, reqs: list[Request], arrivals: list[float], max_batch: int, seed: int
) -> list[Completion]:
    """Static batching under arrivals, on any KV storage: each batch takes up to max_batch
    requests that have arrived and runs to its longest member; times count from arrival."""
    start, i, out = time.perf_counter(), 0, []
    while i < len(reqs):
        time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        now = time.perf_counter() - start
        j = i + 1
        while j < len(reqs) and j - i < max_batch and arrivals[j] <= now:
            j += 1
        for k, c in enumerate(engine.generate(reqs[i:j], seed), start=i):
            c.token_times = [t + now - arrivals[k] for t in c.token_times]
            out.append(c)
        i = j
    return out


def engine_runner(engine: Engine, sched: Any, arrivals: list[float] | None, seed: int) -> Runner:
    """Static batches run through generate() (row caches) or the static scheduler (paged);
    continuous batching and online arrivals put every request under one scheduler."""
    one_scheduler = sched.kind == "continuous" or arrivals is not None

    def generate(reqs: list[Request]) -> list[Completion]:
        if sched.kind == "static" and engine.kv.kind != "paged" and arrivals is not None:
            return static_online(engine, reqs, arrivals, sched.max_batch, seed)
        if sched.kind == "static" and arrivals is None:
            return engine.generate(reqs, seed)
        return engine.serve(
            reqs,
            sched.kind,
            sched.policy,
            sched.max_batch,
            sched.max_tokens_per_step,
            arrivals,
            seed,
        )

    return Runner(
        generate,
        engine.teacher_forced_logits,
        lambda: engine.peak_kv_bytes,
        (lambda reqs: [reqs]) if one_scheduler else (lambda reqs: batches(reqs, sched.max_batch)),
        lambda: dict(engine.stats),
        engine.reset,
    )
