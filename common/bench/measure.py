"""Measure one variant in this process: warm-up, timed repetitions, memory, fidelity.

Called by the orchestrator's worker subprocess, so every variant starts from clean memory
and clean caches. Times are per request from its batch start (static batches run in turn).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.bench.workload import batches
from common.core.request import Completion, Request
from common.engine.engine import Engine
from common.kv.cache import kv_token_bytes
from common.quant.int8 import Int8Embedding, weight_bytes


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


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype, int8: bool = False) -> int:
    a = model.args
    return kv_token_bytes(a.num_hidden_layers, a.num_key_value_heads, a.kv_head_dim, dtype, int8)


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes read per decode step: everything but embedding tables (one row is read),
    unless an LM head shares the table."""
    tables = (nn.Embedding, Int8Embedding)

    def own(m: nn.Module) -> list[Tensor]:
        return [*m.parameters(recurse=False), *m.buffers(recurse=False)]

    read = {id(t) for m in model.modules() if not isinstance(m, tables) for t in own(m)}
    embeddings = {
        id(t): t.nbytes
        for m in model.modules()
        if isinstance(m, tables)
        for t in own(m)
        if id(t) not in read
    }
    return weight_bytes(model) - sum(embeddings.values())


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _pass(
    runner: Runner, groups: list[list[Request]], queued: bool, slo: tuple | None, roof: Callable
) -> dict:
    """One timed pass. queued: all requests arrived at t=0, so a later static batch's times
    include its wait (offline throughput); otherwise each group's times start with it."""
    runner.reset()
    t0 = time.perf_counter()
    done = []
    for g in groups:
        offset = time.perf_counter() - t0 if queued else 0.0
        comps = runner.generate(g)
        for c in comps:
            c.token_times = [t + offset for t in c.token_times]
        done.append(comps)
    wall = time.perf_counter() - t0
    comps = [c for batch in done for c in batch]
    decode_tokens = sum(len(c.tokens) - 1 for c in comps)
    decode_time = sum(max(c.token_times[-1] for c in b) - min(c.ttft for c in b) for b in done)
    ttfts = [1e3 * c.ttft for c in comps]
    tpots = [1e3 * c.tpot for c in comps if c.tpot is not None]
    metrics = {
        "ttft_ms": statistics.median(ttfts),
        "tpot_ms": statistics.median(tpots) if tpots else float("nan"),
        "tokens_per_s": sum(len(c.tokens) for c in comps) / wall,
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 else float("nan"),
        "requests_per_s": len(comps) / wall,
        "e2e_s": wall,
        "decode_s": decode_time,
        "preemptions": sum(c.preemptions for c in comps),
        "outputs": [c.tokens for c in comps],
    }
    stats = runner.stats()
    metrics["roofline_pct"] = roof(stats, decode_time)
    if stats.get("kv_reserved_byte_steps"):  # time averages over engine steps
        metrics["kv_reserved_bytes"] = stats["kv_reserved_byte_steps"] / stats["kv_steps"]
        metrics["kv_used_bytes"] = stats["kv_used_byte_steps"] / stats["kv_steps"]
        metrics["kv_waste_pct"] = 100.0 * (
            1 - metrics["kv_used_bytes"] / metrics["kv_reserved_bytes"]
        )
    if stats.get("capacity_row_steps"):  # decode slots that ran no sequence (static batches)
        metrics["idle_pct"] = 100.0 * (1 - stats["useful_row_steps"] / stats["capacity_row_steps"])
    for q in (50, 90, 99):
        metrics[f"ttft_p{q}_ms"] = _percentile(ttfts, q)
        metrics[f"tpot_p{q}_ms"] = _percentile(tpots, q)
    if slo:  # goodput: requests per second that met both latency objectives
        ok = sum(
            1e3 * c.ttft <= slo[0] and (c.tpot is None or 1e3 * c.tpot <= slo[1]) for c in comps
        )
        metrics["goodput_rps"] = ok / wall
    return metrics


def measure(
    runner: Runner,
    requests: list[Request],
    warmup: int,
    repeats: int,
    roof: Callable[[dict, float], float],
    queued: bool = False,
    slo: tuple[float, float] | None = None,
) -> tuple[list[dict], list[list[int]]]:
    """(metrics of each timed pass, outputs of the last pass)."""
    groups = runner.groups(requests)
    for _ in range(warmup):
        _pass(runner, groups, queued, slo, roof)
    runs = [_pass(runner, groups, queued, slo, roof) for _ in range(repeats)]
    return [{k: v for k, v in r.items() if k != "outputs"} for r in runs], runs[-1]["outputs"]


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Median and [min, max] of every metric over timed passes."""
    keys = [k for k in runs[0] if k not in ("e2e_s", "decode_s")]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    return median, spread


def roofline(
    model: nn.Module, kv_dtype: torch.dtype, bandwidth: float, kv_int8: bool = False
) -> Callable[[dict, float], float]:
    """% of the memory-bandwidth bound achieved in decode: every decode step reads the weights
    once plus each row's live KV; bound time = bytes / bandwidth, against measured decode time."""
    weights, per_token = decode_weight_bytes(model), kv_bytes_per_token(model, kv_dtype, kv_int8)

    def pct(stats: dict, decode_s: float) -> float:
        if not stats.get("decode_steps") or decode_s <= 0:
            return float("nan")
        total = stats["decode_steps"] * weights + stats["decode_ctx_tokens"] * per_token
        return 100.0 * total / bandwidth / decode_s

    return pct


def fidelity(
    runner: Runner,
    requests: list[Request],
    reference: Path,
    is_baseline: bool,
    outputs: list[list[int]],
) -> dict:
    """Teacher-force the baseline's output through this variant; compare logits with the
    baseline's teacher-forced logits. The baseline writes the reference."""
    if is_baseline:
        logits = {
            f"r{i}": runner.teacher_forced_logits(r.prompt, o).contiguous()
            for i, (r, o) in enumerate(zip(requests, outputs))
        }
        save_file(logits, str(reference / "logits.safetensors"))
        torch.save(outputs, reference / "outputs.pt")
        return {"token_agreement": 1.0, "max_logit_err": 0.0, "same_outputs": 1.0}
    ref_logits = load_file(str(reference / "logits.safetensors"))
    ref_outputs = torch.load(reference / "outputs.pt", weights_only=True)
    agree = total = 0
    err = 0.0
    for i, (r, o) in enumerate(zip(requests, ref_outputs)):
        got, ref = runner.teacher_forced_logits(r.prompt, o), ref_logits[f"r{i}"]
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(o)
        err = max(err, float((got - ref).abs().max()))
    same = sum(list(o) == list(r) for o, r in zip(outputs, ref_outputs)) / len(ref_outputs)
    return {"token_agreement": agree / total, "max_logit_err": err, "same_outputs": same}


def same_as_alone(runner: Runner, requests: list[Request], outputs: list[list[int]]) -> dict:
    """Run every request by itself through the same variant: the share whose tokens equal
    what it produced inside the batch (batch invariance; exact in fp32, where batch
    composition cannot change rounding)."""
    alone = [runner.generate([r])[0].tokens for r in requests]
    same = sum(a == list(o) for a, o in zip(alone, outputs)) / len(requests)
    return {"same_as_alone": same}
