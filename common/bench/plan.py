"""Which rows a benchmark runs, what they are compared by, and how their results are named."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

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
