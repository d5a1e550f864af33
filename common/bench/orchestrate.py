"""Benchmark orchestration: one worker subprocess per variant, then one table.

The orchestrator re-runs the recipe's own entry point with `bench.role=worker`, the user's
overrides and the variant's opts, so a worker composes its config exactly as a user run
would, and starts with clean memory and compile caches.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.bench.cli import CONFIG_DIR
from common.bench.measure import summarize
from common.bench.plan import SPEEDUP, Variant, _job_suffix, _label, plan, speedup, workload_desc
from common.bench.report import command_line, environment, print_table, write_results
from common.bench.spawn import _spawn
from common.bench.worker import kv_spec
from common.core.errors import RecipeError
from common.core.request import SamplingParams
from common.device.probe import measure_read_bandwidth
from common.device.select import resolve_dtype, select_device
from common.io.checkpoint import args_from_hf
from common.nn.causal_lm import CausalLM
from common.transforms.registry import available_opts, check_opts_supported

# ---------------------------------------------------------------- worker (one variant)


# ---------------------------------------------------------------- orchestrator


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
