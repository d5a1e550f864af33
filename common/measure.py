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

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.engine import Completion, Engine, Request


@dataclass
class Runner:
    """What a variant is: generate a batch, teacher-force a continuation, report KV bytes."""

    generate: Callable[[list[Request]], list[Completion]]
    teacher_forced_logits: Callable[[list[int], list[int]], Tensor]
    peak_kv_bytes: Callable[[], int]


def engine_runner(engine: Engine, seed: int) -> Runner:
    return Runner(
        lambda reqs: engine.generate(reqs, seed),
        engine.teacher_forced_logits,
        lambda: engine.peak_kv_bytes,
    )


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    a = model.args
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.kv_head_dim * dtype.itemsize


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes read per decode step: everything but embedding tables (one row is read)."""
    from common.quant import weight_bytes

    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = sum(
        m.weight.nbytes
        for m in model.modules()
        if isinstance(m, nn.Embedding) and id(m.weight) not in linear
    )
    return weight_bytes(model) - embeddings


def _pass(runner: Runner, groups: list[list[Request]]) -> dict:
    t0 = time.perf_counter()
    done = [runner.generate(g) for g in groups]
    wall = time.perf_counter() - t0
    comps = [c for batch in done for c in batch]
    decode_tokens = sum(len(c.tokens) - 1 for c in comps)
    decode_time = sum(max(c.token_times[-1] for c in b) - min(c.ttft for c in b) for b in done)
    tpots = [c.tpot for c in comps if c.tpot is not None]
    return {
        "ttft_ms": 1e3 * statistics.median(c.ttft for c in comps),
        "tpot_ms": 1e3 * statistics.median(tpots) if tpots else float("nan"),
        "tokens_per_s": sum(len(c.tokens) for c in comps) / wall,
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 else float("nan"),
        "e2e_s": wall,
        "decode_s": decode_time,
        "outputs": [c.tokens for c in comps],
    }


def measure(
    runner: Runner, groups: list[list[Request]], warmup: int, repeats: int, progress=None
) -> tuple[dict, dict, list[list[int]]]:
    """(median metrics, [min, max] per metric, outputs of the last pass)."""
    for _ in range(warmup):
        _pass(runner, groups)
        if progress:
            progress()
    runs = []
    for _ in range(repeats):
        runs.append(_pass(runner, groups))
        if progress:
            progress()
    keys = [k for k in runs[0] if k != "outputs"]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    return median, spread, runs[-1]["outputs"]


def roofline_pct(
    model: nn.Module,
    groups: list[list[Request]],
    outputs: list[list[int]],
    decode_s: float,
    kv_dtype: torch.dtype,
    bandwidth: float,
) -> float:
    """Share of the memory-bandwidth bound achieved in decode: for every decode step, the
    weights plus the live KV are read once; bound time = bytes / bandwidth."""
    weights, per_token = decode_weight_bytes(model), kv_bytes_per_token(model, kv_dtype)
    total_bytes, i = 0, 0
    for g in groups:
        outs = outputs[i : i + len(g)]
        i += len(g)
        steps = max(len(o) for o in outs) - 1
        live = sum(len(r.prompt) + len(o) / 2 for r, o in zip(g, outs))  # mean context per step
        total_bytes += steps * (weights + per_token * live)
    return 100.0 * total_bytes / bandwidth / decode_s if decode_s > 0 else float("nan")


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
        return {"token_agreement": 1.0, "max_logit_err": 0.0}
    ref_logits = load_file(str(reference / "logits.safetensors"))
    ref_outputs = torch.load(reference / "outputs.pt", weights_only=True)
    agree = total = 0
    err = 0.0
    for i, (r, o) in enumerate(zip(requests, ref_outputs)):
        got, ref = runner.teacher_forced_logits(r.prompt, o), ref_logits[f"r{i}"]
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(o)
        err = max(err, float((got - ref).abs().max()))
    return {"token_agreement": agree / total, "max_logit_err": err}
