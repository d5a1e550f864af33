"""The scheduler's per-step plan: which sequences run and which tokens each computes. Plain
data (no tensors); the model runner turns it into one batch (common/engine/runner.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.core.request import SamplingParams
from common.kv.ops import KVOps


@dataclass(slots=True)
class ScheduledSeq:
    seq_id: int
    start: int  # position of tokens[0]: the sequence's tokens before it have KV stored
    tokens: list[int]  # computed this step: a prompt chunk, one decode token, or k + 1 to verify
    sample: bool  # this step reaches the sequence's end: sample its next token
    decode: bool  # the sequence is past its prompt
    history: list[int]  # all of the sequence's tokens (the sampler's processors read them)
    sampling: SamplingParams
    where: int | list[int]  # its KV: a row (row storage) or a block table (paged)
    extras: Any = None  # per-sequence extra model inputs (encoded content), opaque here
    num_draft: int = 0  # the last num_draft tokens are a speculation to verify


@dataclass(slots=True)
class StepPlan:
    seqs: list[ScheduledSeq]
    kv_ops: KVOps = field(default_factory=KVOps)  # applied to the storage before the forward
    capacity: int = 0  # sequences a step may run (scheduler.max_batch): idle-slot statistics
