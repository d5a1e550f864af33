"""Benchmark orchestration: one worker subprocess per variant, then one table.

The orchestrator re-runs the recipe's own entry point with `bench.role=worker`, the user's
overrides and the variant's opts, so a worker composes its config exactly as a user run
would, and starts with clean memory and compile caches.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from common.bench.cli import CONFIG_DIR
from common.bench.measure import (
    engine_runner,
    fidelity,
    kv_bytes_per_token,
    measure,
    roofline,
    same_as_alone,
    summarize,
)
from common.bench.report import command_line, environment, print_table, write_results
from common.bench.workload import arrival_times, build_requests
from common.core.errors import RecipeError
from common.core.request import Request, SamplingParams
from common.device.probe import measure_read_bandwidth
from common.device.select import resolve_dtype, select_device
from common.engine.engine import Engine
from common.io.checkpoint import args_from_hf
from common.kv.cache import KVSpec
from common.nn.causal_lm import CausalLM
from common.quant.int8 import weight_bytes
from common.transforms.registry import apply_transforms, available_opts, check_opts_supported

QUEUED = ("throughput", "online")
# What "speedup" compares, per workload: the metric users of that workload care about.
SPEEDUP = {
    "latency": ("decode_tokens_per_s", "decode tok/s"),
    "file": ("decode_tokens_per_s", "decode tok/s"),
    "throughput": ("tokens_per_s", "output tok/s"),
    "online": ("tokens_per_s", "output tok/s"),
    "shared_prefix": ("ttft_ms", "TTFT (baseline TTFT / variant TTFT)"),
}


def speedup(metrics: dict, base: dict, key: str) -> float:
    lower_is_better = key.endswith("_ms")
    num, den = (base[key], metrics[key]) if lower_is_better else (metrics[key], base[key])
    return (
        num / den if den else float("nan")
    )  # all requests are in the system together: times include waiting


@dataclass
class Variant:
    name: str
    opts: list[str]
    peer: str | None = None


def plan(
    opts: list[str], ladder: bool, each: bool, peers: list[str], rows: list[list[str]] | None = None
) -> list[Variant]:
    """Rows after the baseline: explicit opt lists (bench.variants), a cumulative ladder, each
    opt alone, or all opts together; then the peers."""
    variants = [Variant("baseline", [])]
    if rows:
        variants += [Variant("+".join(r), list(r)) for r in rows]
    elif ladder:
        variants += [
            Variant("+" + " +".join(opts[: i + 1]), opts[: i + 1]) for i in range(len(opts))
        ]
    elif each:
        variants += [Variant(o, [o]) for o in opts]
    elif opts:
        variants.append(Variant("+".join(opts), opts))
    return variants + [Variant(f"{p} generate()", [], peer=p) for p in peers]


def workload_desc(w: Any) -> str:
    if w.kind == "file":
        return f"file {w.path}, batch {w.batch_size}, max_new_tokens {w.max_new_tokens}"
    plain = OmegaConf.to_container(w, resolve=True)
    n = plain.get("num_prompts", plain.get("num_requests"))
    prefix = f"{plain['prefix_len']}-token shared prefix + " if "prefix_len" in plain else ""
    rate = f", Poisson arrivals at {plain['rate']} req/s" if "rate" in plain else ""
    new = plain["max_new_tokens"]
    if plain.get("new_tokens_dist") == "exponential":
        new = f"{new} (exponential, mean {plain['new_tokens_mean']})"
    return (
        f"{w.kind}: {n} requests, prompt {prefix}{plain['prompt_len']} tokens, "
        f"{new} new tokens, batch {w.batch_size}{rate}, greedy, "
        f"EOS {'ignored' if w.ignore_eos else 'stops'}"
    )


# ---------------------------------------------------------------- worker (one variant)


def kv_spec(cfg: Any) -> KVSpec:
    kv = cfg.kv_cache
    # int8 needs preallocated storage: on the default growing cache it takes the contiguous one,
    # so +opt=kv_int8 works alone and composes with static_kv / paged_kv in any order.
    kind = "contiguous" if kv.int8 and kv.kind == "dynamic" else kv.kind
    return KVSpec(
        kind, kv.int8, kv.block_size, cfg.scheduler.kv_budget, kv.prefix_cache, kv.max_len
    )


def kv_capacity(
    requests: list[Request],
    per_token: int,
    spec: KVSpec,
    batch: int,
) -> dict:
    """How many of the workload's sequences fit in one KV budget: contiguous allocation gives
    every sequence kv_cache.max_len slots (or the workload's longest); paged gives each
    ceil(len / block) blocks. The budget defaults to what contiguous needs for `batch`."""
    lengths = [len(r.prompt) + r.max_new_tokens for r in requests]
    slots = spec.max_len or max(lengths)
    budget = spec.budget_bytes or batch * slots * per_token
    blocks_left = budget // (spec.block_size * per_token)
    paged = 0
    while True:  # sequences in arrival order, cycling, until the next one does not fit
        need = -(-lengths[paged % len(lengths)] // spec.block_size)
        if need > blocks_left:
            break
        blocks_left -= need
        paged += 1
    return {
        "kv_budget_bytes": budget,
        "max_concurrent_contiguous": budget // (slots * per_token),
        "max_concurrent_paged": paged,
    }


def run_worker(cfg: Any, model_cls: type[CausalLM]) -> None:
    from common.bench.peers import peer_runner
    from common.io.presets import build_model

    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    device = select_device(cfg.hardware.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tokenizer, weights_desc = build_model(cfg.model, model_cls, device.torch, dtype)
    requests = build_requests(cfg.workload, model.args.vocab_size, tokenizer)
    arrivals = arrival_times(cfg.workload, len(requests))
    sampling = SamplingParams(**cfg.generation)
    for r in requests:
        r.sampling = sampling
    spec = kv_spec(cfg)
    if cfg.bench.peer:
        runner = peer_runner(cfg.bench.peer, model, cfg.scheduler.max_batch)
    else:
        model = apply_transforms(model, cfg)
        engine = Engine(model, device, spec, cfg.attention.backend)
        for r in requests:
            engine.check(r)
        runner = engine_runner(engine, cfg.scheduler, arrivals, cfg.bench.seed)
    w = cfg.workload
    slo = (w.slo_ttft_ms, w.slo_tpot_ms) if "slo_ttft_ms" in w else None
    roof = roofline(model, dtype, float(cfg.bench.bandwidth), spec.int8)
    runs, outputs = measure(
        runner, requests, cfg.bench.warmup, cfg.bench.repeats, roof, w.kind in QUEUED, slo
    )
    reference = Path(cfg.bench.reference)
    per_token = kv_bytes_per_token(model, dtype, spec.int8)
    first_round = cfg.bench.get("round", 0) == 0
    result = {
        "runs": runs,
        "metrics": {
            "weight_bytes": weight_bytes(model),
            "kv_bytes": runner.peak_kv(),
            **kv_capacity(requests, per_token, spec, cfg.scheduler.max_batch),
            "peak_mem_bytes": device.peak_memory_bytes(),
        },
        "fidelity": {
            **fidelity(
                runner, requests, reference, not (reference / "outputs.pt").exists(), outputs
            ),
            **(same_as_alone(runner, requests, outputs) if cfg.bench.check_alone else {}),
        }
        if first_round
        else None,
        "outputs": outputs,
        "model": f"{cfg.model.name}, {weights_desc}, {str(dtype).removeprefix('torch.')}",
        "device": device.describe(),
        "threads": torch.get_num_threads(),
    }
    Path(cfg.bench.worker_out).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestrator


def _spawn(script: str, overrides: list[str], variant: Variant, extra: list[str]) -> dict:
    opt_arg = [f"+opt=[{','.join(variant.opts)}]"] if variant.opts else []
    peer_arg = [f"bench.peer={variant.peer}"] if variant.peer else []
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            sys.executable,
            script,
            *overrides,
            *opt_arg,
            *peer_arg,
            *extra,
            f"bench.worker_out={out.name}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
            raise RecipeError(f"variant {variant.name!r} failed: {last}")
        return json.loads(Path(out.name).read_text())


def _label(opts: list[str], rows: list[list[str]], bench: Any) -> str:
    """The results file name: the rows compared, and how they were expanded (ladder, each,
    peers), so runs of the same opts with different rows never overwrite each other."""
    label = "vs-" + ",".join("+".join(r) for r in rows) if rows else "+".join(opts) or "baseline"
    extras = [k for k in ("ladder", "each") if bench[k]] + [f"with-{p}" for p in bench.peers]
    return "-".join([label, *extras])


def _job_suffix() -> str:
    """Under -m, each job's own overrides name its results, so jobs never overwrite each other."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    return "@" + re.sub(r"[^\w.=,+-]+", "_", hc.job.override_dirname)


def run_main(cfg: Any, model_cls: type[CausalLM], user_overrides: list[str]) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.io.presets import preset_args

    start = time.perf_counter()
    device = select_device(cfg.hardware.device)
    check_opts_supported(cfg.opts, device)
    resolve_dtype(cfg.model.dtype, device)
    SamplingParams(**cfg.generation)
    if cfg.model.path:
        args_from_hf(model_cls, cfg.model.path)  # a missing dir or bad config.json fails here
    else:
        preset_args(cfg.model, model_cls)
    if cfg.bench.repeats < 1 or cfg.bench.rounds < 1 or cfg.bench.warmup < 0:
        raise RecipeError("bench.repeats and bench.rounds must be >= 1, bench.warmup >= 0")
    if not cfg.bench.each:  # the combined variant must be a valid KV choice
        kv_spec(cfg)
    opts = list(cfg.opts)
    rows = [list(r) for r in cfg.bench.variants or []]
    if rows and opts:
        raise RecipeError(
            "give the rows either as +opt=... or as bench.variants=[[...], ...], not both"
        )
    known = available_opts(CONFIG_DIR)
    for name in {o for r in rows for o in r} - set(known):
        raise RecipeError(f"unknown opt {name!r} in bench.variants; available: {', '.join(known)}")
    variants = plan(opts, cfg.bench.ladder, cfg.bench.each, list(cfg.bench.peers), rows)
    bandwidth, bw_source = (
        (cfg.hardware.mem_bw_gbs * 1e9, "hardware config")
        if cfg.hardware.mem_bw_gbs
        else (measure_read_bandwidth(device), "measured streaming read")
    )
    sweep = cfg.bench.sweep
    points = [(sweep.key, v) for v in sweep["values"]] if sweep else [(None, None)]
    jobs = [  # (row name, variant, sweep key, value)
        (
            Variant(f"{v.name} @ {key.split('.')[-1]}={value}" if key else v.name, v.opts, v.peer),
            v,
            key,
            value,
        )
        for key, value in points
        for v in variants
    ]
    rounds = cfg.bench.rounds
    collected: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory() as ref,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        ) as progress,
    ):
        task = progress.add_task("benchmark", total=len(jobs) * rounds)
        extra = ["bench.role=worker", f"bench.reference={ref}", f"+bench.bandwidth={bandwidth}"]
        # Rounds interleave the variants, so drift on a shared machine hits all of them alike.
        for r in range(rounds):
            for named, v, key, value in jobs:
                progress.update(task, description=f"round {r + 1}/{rounds}: {named.name}")
                point = [f"{key}={value}"] if key else []
                out = _spawn(sys.argv[0], user_overrides + point, v, extra + [f"+bench.round={r}"])
                if r == 0:
                    collected[named.name] = {**out, "variant": named}
                else:
                    collected[named.name]["runs"] += out["runs"]
                progress.advance(task)
    results = []
    for entry in collected.values():
        median, spread = summarize(entry["runs"])
        entry["metrics"] = {**median, **entry["metrics"]}
        entry["spread"] = spread
        results.append((entry["variant"], entry))
    base = results[0][1]["metrics"]
    speedup_key, speedup_of = SPEEDUP[cfg.workload.kind]
    hardware = cfg.hardware.name or device.type
    result = {
        "recipe": cfg.recipe,
        "command": command_line(),
        "hardware": hardware,
        "env": environment(results[0][1]["device"], results[0][1]["threads"]),
        "model": results[0][1]["model"],
        "opts": opts,
        "rows": [v.name for v, _ in results],
        "workload": OmegaConf.to_container(cfg.workload, resolve=True),
        "workload_desc": workload_desc(cfg.workload),
        "generation": OmegaConf.to_container(cfg.generation),
        "bench": {k: cfg.bench[k] for k in ("warmup", "repeats", "rounds", "ladder", "each")},
        "speedup_of": speedup_of,
        "kv_max_len": cfg.kv_cache.max_len,
        "sweep": OmegaConf.to_container(sweep) if sweep else None,
        "bandwidth_gbs": bandwidth / 1e9,
        "bandwidth_source": bw_source,
        "wall_s": time.perf_counter() - start,
        "variants": [
            {
                "name": v.name,
                "opts": v.opts,
                "peer": v.peer,
                "metrics": {**r["metrics"], "speedup": speedup(r["metrics"], base, speedup_key)},
                "spread": r["spread"],
                "fidelity": r["fidelity"],
                "outputs": r["outputs"],
            }
            for v, r in results
        ],
    }
    stem = (
        Path(cfg.bench.results_dir)
        / cfg.recipe
        / hardware
        / f"{'sweep-' if sweep else ''}{cfg.workload.kind}-{_label(opts, rows, cfg.bench)}{_job_suffix()}"
    )
    print_table(result)
    for p in write_results(result, stem):
        print(f"wrote {p}")
    return result
