"""Measure one variant in this process: warm-up, timed repetitions, memory, fidelity.

Called by the orchestrator's worker subprocess, so every variant starts from clean memory
and clean caches. Times are per request from its batch start (static batches run in turn).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from common.bench.runners import Runner
from common.core.request import Request
from common.io.checkpoint import build_empty
from common.nn.causal_lm import CausalLM, ModelArgs
from common.parallel.layout import ONE_DEVICE, Layout
from common.parallel.measured import decode_weight_bytes
from common.parallel.memory import kv_bytes_per_token


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _pass(
    runner: Runner,
    groups: list[list[Request]],
    queued: bool,
    slo: tuple | None,
    roof: Callable,
    online: bool = False,
) -> dict:
    """One timed pass. queued: all requests arrived at t=0, so a later static batch's times
    include its wait (offline throughput); otherwise each group's times start with it.
    online: each request's times start at its own arrival, so requests share no decode span
    and decode tok/s (and the roofline share built on it) is not defined."""
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
    decode_time = (
        float("nan")
        if online
        else sum(max(c.token_times[-1] for c in b) - min(c.ttft for c in b) for b in done)
    )
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
        "truncated": sum(c.truncated for c in comps),  # cut by the model's max positions
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
    if "bubble_pct" in stats:  # pipeline parallel: the share of time stages sat idle
        metrics["bubble_pct"] = stats["bubble_pct"]
    if stats.get("spec_proposed"):  # speculative decoding
        metrics["spec_accept_pct"] = 100.0 * stats["spec_accepted"] / stats["spec_proposed"]
        # tokens each verification emits: the accepted drafts plus the target's own token
        metrics["spec_tokens_per_step"] = 1 + stats["spec_accepted"] / stats["spec_steps"]
    if stats.get("capacity_row_steps"):  # decode slots that ran no sequence (static batches)
        metrics["idle_pct"] = 100.0 * (1 - stats["useful_row_steps"] / stats["capacity_row_steps"])
    metrics.update(_encoder_metrics(stats, [r for g in groups for r in g], ttfts))
    for q in (50, 90, 99):
        metrics[f"ttft_p{q}_ms"] = _percentile(ttfts, q)
        metrics[f"tpot_p{q}_ms"] = _percentile(tpots, q)
    if slo:  # goodput: requests per second that met both latency objectives
        ok = sum(
            1e3 * c.ttft <= slo[0] and (c.tpot is None or 1e3 * c.tpot <= slo[1]) for c in comps
        )
        metrics["goodput_rps"] = ok / wall
    return metrics


def _encoder_metrics(stats: dict, requests: list[Request], ttfts: list[float]) -> dict:
    """For requests with encoded content (images), when the engine reports its encoder:
    encoder ms per item in the workload (cache hits cost nothing), hit rate, the share of
    encoder time hidden behind the language model, and median TTFT of requests whose
    content all appeared in an earlier request vs the others."""
    items = sum(len(r.mm_items) for r in requests)
    if not items:
        return {}
    out = {}
    if "encoder_encode_s" in stats or stats.get("encoder_cache_hits"):
        encode_s = stats.get("encoder_encode_s", 0.0)
        out["encode_ms_per_item"] = 1e3 * encode_s / items
        if stats.get("encoder_cache_lookups"):
            hits = stats.get("encoder_cache_hits", 0)
            out["encoder_cache_hit_pct"] = 100.0 * hits / stats["encoder_cache_lookups"]
        if stats.get("encoder_prefetched") and encode_s > 0:  # overlap ran
            out["encode_hidden_pct"] = 100.0 * stats.get("encoder_hidden_s", 0.0) / encode_s
    seen: set[bytes] = set()
    split: dict[bool, list[float]] = {True: [], False: []}
    for r, ttft in zip(requests, ttfts):
        digests = {m.digest for m in r.mm_items}
        if digests:
            split[digests <= seen].append(ttft)
        seen |= digests
    for repeat, key in ((True, "ttft_seen_ms"), (False, "ttft_new_ms")):
        if split[repeat]:
            out[key] = statistics.median(split[repeat])
    return out


def measure(
    runner: Runner,
    requests: list[Request],
    warmup: int,
    repeats: int,
    roof: Callable[[dict, float], float],
    queued: bool = False,
    slo: tuple[float, float] | None = None,
    online: bool = False,
) -> tuple[list[dict], list[list[int]]]:
    """(metrics of each timed pass, outputs of the last pass)."""
    groups = runner.groups(requests)
    for _ in range(warmup):
        _pass(runner, groups, queued, slo, roof, online)
    runs = [_pass(runner, groups, queued, slo, roof, online) for _ in range(repeats)]
    return [{k: v for k, v in r.items() if k != "outputs"} for r in runs], runs[-1]["outputs"]


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Median and [min, max] of every metric over timed passes."""
    keys = [k for k in runs[0] if k not in ("e2e_s", "decode_s")]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    return median, spread


def roofline(
    model: nn.Module,
    kv_dtype: torch.dtype,
    bandwidth: float,
    kv_int8: bool = False,
    layout: Layout = ONE_DEVICE,
    stage: int = 0,
    weights: int | None = None,
) -> Callable[[dict, float], float]:
    """% of the memory-bandwidth bound achieved in decode: every decode step reads the weights
    once (as this model holds them, whatever transforms ran, or `weights` bytes as a peer
    holds them) plus each row's live KV; bound time = bytes / bandwidth, against measured
    decode time."""
    weights = weights or decode_weight_bytes(model)
    per_token = kv_bytes_per_token(model.args, kv_dtype, kv_int8, layout, stage)  # this rank's

    def pct(stats: dict, decode_s: float) -> float:
        if not stats.get("decode_steps") or decode_s <= 0:
            return float("nan")
        total = stats["decode_steps"] * weights + stats["decode_ctx_tokens"] * per_token
        return 100.0 * total / bandwidth / decode_s

    return pct


def decode_step_bytes(
    model_cls: type[CausalLM],
    args: ModelArgs,
    dtype: torch.dtype,
    requests: list[Request],
    max_batch: int,
) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of the unoptimized model reads on this
    workload: every weight but the embedding table, and the live KV of a full batch at the
    requests' mean context over their decode (prompt + half the new tokens). The bandwidth
    probe reads a buffer of this size. Built on the meta device: nothing is allocated."""
    weights = decode_weight_bytes(build_empty(lambda: model_cls(args)).to(dtype))
    rows = min(max_batch, len(requests))
    ctx = statistics.mean(len(r.prompt) + r.max_new_tokens / 2 for r in requests)
    return weights, round(rows * ctx * kv_bytes_per_token(args, dtype))
