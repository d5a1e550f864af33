"""Benchmark orchestration: one worker subprocess per variant, then one table.

The orchestrator re-runs the recipe's own entry point with `bench.role=worker`, the user's
overrides and the variant's opts, so a worker composes its config exactly as a user run
would, and starts with clean memory and compile caches. Everything a worker could reject is
checked first (preflight), and the results' name is claimed before the first worker starts.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.bench.destination import claim, identity_hash, run_identity
from common.bench.measure import decode_step_bytes, summarize
from common.bench.plan import SPEEDUP, Variant, results_name, speedup, workload_desc
from common.bench.preflight import Checked, preflight
from common.bench.report import command_line, environment, print_table, write_results
from common.bench.spawn import spawn
from common.core.errors import RecipeError
from common.device.probe import measure_read_bandwidth
from common.device.select import resolve_dtype
from common.nn.causal_lm import CausalLM
from common.parallel.launch import free_port, torchrun_prefix, under_torchrun


@dataclass(frozen=True)
class Job:
    row: Variant  # the variant as named in the table (with the sweep point, if any)
    variant: Variant
    point: list[str]  # the sweep override for this row, if any


def _job_overrides() -> list[str]:
    """This job's command-line overrides, without the opts (each variant adds its own)."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not re.match(r"^\+{0,2}opt=", o)]


def _bandwidth(cfg: Any, checked: Checked, model_cls: type[CausalLM]) -> tuple[float, str, int]:
    """(bytes/s for the roofline, where it came from, the probe's buffer bytes or 0): a
    streaming read over a buffer the size of what one baseline decode step reads."""
    if cfg.hardware.mem_bw_gbs:
        return cfg.hardware.mem_bw_gbs * 1e9, "hardware config", 0
    dtype = resolve_dtype(cfg.model.dtype, checked.device)
    weights, kv = decode_step_bytes(
        model_cls, checked.args, dtype, checked.requests, cfg.scheduler.max_batch
    )
    source = (
        f"measured: streaming read of a {(weights + kv) / 1e6:.3g} MB buffer, one baseline "
        f"decode step (weights {weights / 1e6:.3g} MB + KV {kv / 1e6:.3g} MB)"
    )
    return measure_read_bandwidth(checked.device, weights + kv), source, weights + kv


def _jobs(cfg: Any, variants: list[Variant]) -> list[Job]:
    sweep = cfg.bench.sweep
    points = [(sweep.key, v) for v in sweep["values"]] if sweep else [(None, None)]
    return [
        Job(
            Variant(f"{v.name} @ {key.split('.')[-1]}={value}", v.opts, v.peer, v.overrides)
            if key
            else v,
            v,
            [f"{key}={value}"] if key else [],
        )
        for key, value in points
        for v in variants
    ]


def launcher(cfg: Any) -> list[str] | None:
    """torchrun's command for a variant over several ranks; None for one process."""
    par = cfg.parallel
    world = par.tp * par.pp
    if world == 1:
        return None
    port = par.master_port or free_port()
    return torchrun_prefix(world // par.nnodes, par.nnodes, par.node_rank, par.master_addr, port)


def _run_jobs(cfg: Any, jobs: list[Job], bandwidth: float) -> dict[str, dict]:
    """Every job in every round; rounds interleave the variants, so drift on a shared
    machine hits all of them alike. Returns each row's worker output, runs concatenated."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    overrides, rounds = _job_overrides(), cfg.bench.rounds
    collected: dict[str, dict] = {}
    columns = (TextColumn("{task.description}"), BarColumn())
    columns += (TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with tempfile.TemporaryDirectory() as ref, Progress(*columns) as progress:
        task = progress.add_task("benchmark", total=len(jobs) * rounds)
        extra = ["bench.role=worker", f"bench.reference={ref}", f"bench.bandwidth={bandwidth}"]
        for r in range(rounds):
            for job in jobs:
                progress.update(task, description=f"round {r + 1}/{rounds}: {job.row.name}")
                args = [*overrides, *job.point]
                out = spawn(
                    sys.argv[0],
                    args,
                    job.variant,
                    [*extra, f"bench.round={r}"],
                    launcher(OmegaConf.merge(cfg, OmegaConf.from_dotlist(job.point))),
                )
                if out is None:  # rank 0, which reports, ran on node 0
                    progress.advance(task)
                    continue
                if r == 0:
                    collected[job.row.name] = {**out, "variant": job.row}
                else:
                    collected[job.row.name]["runs"] += out["runs"]
                progress.advance(task)
    return collected


def _result(
    cfg: Any, checked: Checked, collected: dict[str, dict], bandwidth: tuple, start: float
) -> dict:
    results = []
    for entry in collected.values():
        median, spread = summarize(entry["runs"])
        entry["metrics"] = {**median, **entry["metrics"]}
        entry["spread"] = spread
        results.append((entry["variant"], entry))
    first = results[0][1]
    base_ppl = (first["fidelity"] or {}).get("perplexity")
    for _, r in results:
        if base_ppl and r["fidelity"] and "perplexity" in r["fidelity"]:
            r["fidelity"]["perplexity_change"] = r["fidelity"]["perplexity"] / base_ppl - 1
    speedup_key, speedup_of = SPEEDUP[cfg.workload.kind]
    identity = run_identity(cfg)
    return {
        "recipe": cfg.recipe,
        "command": command_line(),
        "hardware": cfg.hardware.name or checked.device.type,
        "env": environment(first["device"], first["threads"]),
        "model": first["model"],
        "opts": list(cfg.opts),
        "rows": [v.name for v, _ in results],
        "workload": OmegaConf.to_container(cfg.workload, resolve=True),
        "workload_desc": workload_desc(cfg.workload),
        "generation": OmegaConf.to_container(cfg.generation),
        "bench": {k: cfg.bench[k] for k in ("warmup", "repeats", "rounds", "ladder", "each")},
        "speedup_of": speedup_of,
        "kv_max_len": cfg.kv_cache.max_len,
        "sweep": OmegaConf.to_container(cfg.bench.sweep) if cfg.bench.sweep else None,
        "bandwidth_gbs": bandwidth[0] / 1e9,
        "bandwidth_source": bandwidth[1],
        "bandwidth_buffer_bytes": bandwidth[2],
        "wall_s": time.perf_counter() - start,
        "config": identity,
        "config_hash": identity_hash(identity),
        "variants": [
            {
                "name": v.name,
                "opts": v.opts,
                "peer": v.peer,
                "metrics": {
                    **r["metrics"],
                    "speedup": speedup(r["metrics"], first["metrics"], speedup_key),
                },
                "spread": r["spread"],
                "fidelity": r["fidelity"],
                "outputs": r["outputs"],
                "kv_kind": r.get("kv_kind"),
                "kernels": r.get("kernels", {}),
            }
            for v, r in results
        ],
    }


def run_main(cfg: Any, model_cls: type[CausalLM]) -> dict:
    start = time.perf_counter()
    if under_torchrun():
        raise RecipeError(
            "run.py starts its ranks itself (one torchrun launch per variant): run it with "
            "python, with parallel.tp / parallel.pp (and parallel.nnodes, node_rank, "
            "master_addr, master_port on several nodes), not under torchrun"
        )
    checked = preflight(cfg, model_cls)
    hardware = cfg.hardware.name or checked.device.type
    rows = checked.config.bench.variants
    stem = (
        Path(cfg.bench.results_dir)
        / cfg.recipe
        / hardware
        / results_name(cfg, list(cfg.opts), rows)
    )
    if cfg.parallel.node_rank > 0:  # this node's ranks join node 0's; node 0 reports
        bandwidth = _bandwidth(cfg, checked.device)
        _run_jobs(cfg, _jobs(cfg, checked.variants), bandwidth[0])
        print(f"node {cfg.parallel.node_rank}: ranks done; node 0 writes the results")
        return {}
    with claim(stem, run_identity(cfg), command_line(), cfg.bench.replace) as dest:
        bandwidth = _bandwidth(cfg, checked, model_cls)
        collected = _run_jobs(cfg, _jobs(cfg, checked.variants), bandwidth[0])
        result = _result(cfg, checked, collected, bandwidth, start)
        print_table(result)
        for p in write_results(result, dest.stem):
            print(f"wrote {p}")
    if dest.displaced:
        print(
            f"note: {dest.displaced}.* hold another run (model, workload or settings differ); kept"
        )
    return result
