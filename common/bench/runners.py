"""Runners: how a variant turns a group of requests into completions (our engine or a peer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from common.bench.workload import batches
from common.core.request import Completion, Request
from common.engine.engine import Engine
from common.engine.pipeline import Pipeline
from common.engine.scheduler import SchedulerParams


@dataclass
class Runner:
    """A variant: how to run one group of requests (a static batch, or everything at once
    under a scheduler), teacher-force a continuation (logits [T, V], or only the greedy
    token ids [T] from a peer that gives no logits; keyword stepwise: through decode steps
    where the runner has a decode path of its own), and report KV bytes at the peak."""

    generate: Callable[[list[Request]], list[Completion]]
    teacher_forced_logits: Callable[..., Tensor]  # (prompt, continuation[, mm], stepwise=)
    peak_kv: Callable[[], int]  # reserved KV bytes at the fullest moment
    groups: Callable[[list[Request]], list[list[Request]]]
    stats: Callable[[], dict] = dict  # engine counters since the last reset (decode steps, ...)
    reset: Callable[[], None] = lambda: None
    # A peer in its own process holds its own weights and memory (None: this process's model)
    weight_bytes: int | None = None
    decode_weight_bytes: int | None = None  # bytes a decode step reads, for the roofline
    peak_memory: Callable[[], int] | None = None


def scheduler_config(sched: Any) -> SchedulerParams:
    """The `scheduler:` config group as the engine's SchedulerParams."""
    return SchedulerParams(
        sched.kind,
        sched.policy,
        sched.max_batch,
        sched.max_tokens_per_step,
        sched.preemption,
    )


def engine_runner(engine: Engine, arrivals: list[float] | None, seed: int) -> Runner:
    """Our engine under its scheduler, for every KV kind and scheduler kind. Only the
    grouping differs: offline static batches are timed one batch at a time (each batch's
    times start with it), everything else runs under one scheduler call."""
    per_batch = engine.sched.kind == "static" and arrivals is None
    return Runner(
        lambda reqs: engine.generate(reqs, seed, arrivals),
        engine.teacher_forced_logits,
        lambda: engine.peak_kv_bytes,
        (lambda reqs: batches(reqs, engine.sched.max_batch))
        if per_batch
        else (lambda reqs: [reqs]),
        lambda: dict(engine.stats),
        engine.reset,
    )


def pipeline_runner(pipe: Pipeline, max_batch: int, seed: int) -> Runner:
    """A pipeline-parallel stage: static batches of max_batch, each split into micro-batches."""
    return Runner(
        lambda reqs: pipe.generate(reqs, seed),
        pipe.teacher_forced_logits,
        lambda: pipe.peak_kv_bytes,
        lambda reqs: batches(reqs, max_batch),
        pipe.stats,
    )
