"""Which rows a benchmark runs, what they are compared by, and how their results are named."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from common.bench.peers import peer_rows
from common.core.config import OptSpec
from common.transforms.registry import check_combination

# What "speedup" compares, per workload: the metric users of that workload care about.
SPEEDUP = {
    "latency": ("decode_tokens_per_s", "decode tok/s"),
    "file": ("decode_tokens_per_s", "decode tok/s"),
    "throughput": ("tokens_per_s", "output tok/s"),
    "online": ("tokens_per_s", "output tok/s"),
    "shared_prefix": ("ttft_ms", "TTFT (baseline TTFT / variant TTFT)"),
    "vl": ("ttft_ms", "TTFT (baseline TTFT / variant TTFT)"),
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
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE settings of this row only


def split_row(row: list[str]) -> tuple[list[str], list[str]]:
    """A bench.variants row: opt names, then KEY=VALUE overrides for this row only (quoted
    on the command line: [int4,'quant.group_size=32'])."""
    return [e for e in row if "=" not in e], [e for e in row if "=" in e]


def _row_name(opts: list[str], overrides: list[str]) -> str:
    """int4 g=32 style: the opts, then each override's last key component and value."""
    short = [f"{k.rsplit('.', 1)[-1]}={v}" for k, _, v in (o.partition("=") for o in overrides)]
    return " ".join(["+".join(opts), *short]).strip()


def plan(
    opts: list[str],
    ladder: bool,
    each: bool,
    peers: list[str],
    rows: list[list[str]] | None,
    specs: dict[str, OptSpec],
    dtype: str = "bfloat16",
) -> list[Variant]:
    """Rows after the baseline: explicit rows (bench.variants: opts and KEY=VALUE overrides of
    that row), a cumulative ladder, each opt alone (with the opts it requires), or all opts
    together; then the peers (a peer row carries the opts whose quantization it matches).
    Every row's opts are checked as a combination before any of them runs."""
    if rows:
        split = [split_row(list(r)) for r in rows]
        for row_opts, _ in split:
            check_combination(row_opts, specs)
        variants = [Variant(_row_name(o, v), o, overrides=v) for o, v in split]
        peer_variants = _peer_variants(peers, [o for o, _ in split], dtype)
        return [Variant("baseline", []), *variants, *peer_variants]
    if ladder:
        groups = [opts[: i + 1] for i in range(len(opts))]
    elif each:
        groups = [[*specs[o].requires, o] if o in specs else [o] for o in opts]
    else:
        groups = [opts] if opts else []
    for group in groups:
        check_combination(group, specs)
    name = (lambda g: "+" + " +".join(g)) if ladder else "+".join
    variants = [Variant("baseline", []), *(Variant(name(g), g) for g in groups)]
    return variants + _peer_variants(peers, groups, dtype)


def _peer_variants(peers: list[str], groups: list[list[str]], dtype: str) -> list[Variant]:
    """A peer's rows: each carries the opts whose quantization it matches."""
    return [
        Variant(row, row_opts, peer=p)
        for p in peers
        for row, row_opts in peer_rows(p, groups, dtype)
    ]


def workload_desc(w: Any) -> str:
    if w.kind == "file":
        return f"file {w.path}, batch {w.batch_size}, max_new_tokens {w.max_new_tokens}"
    plain = OmegaConf.to_container(w, resolve=True)
    if w.kind == "vl":
        source = (
            f"file {w.path}"
            if w.path
            else f"{w.num_requests} requests of {w.images_per_request} image(s) "
            f"{w.image_size[0]}x{w.image_size[1]} px (repeat probability {w.repeat}) + "
            f"{w.prompt_len} text tokens"
        )
        return (
            f"vl: {source}, {w.max_new_tokens} new tokens, batch {w.batch_size}, greedy, "
            f"EOS {'ignored' if w.ignore_eos else 'stops'}"
        )
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


def results_name(cfg: Any, opts: list[str], rows: list[list[str]] | None) -> str:
    """The results file name: the workload and the rows compared, how they were expanded
    (ladder, each, peers) and, under -m, the job's own overrides. No dots: a dot would read
    as a file suffix."""
    label = "vs-" + ",".join("+".join(r) for r in rows) if rows else "+".join(opts) or "baseline"
    label = re.sub(r"[^\w=,+-]+", "_", label)  # a row's KEY=VALUE overrides hold dots
    extras = [k for k in ("ladder", "each") if cfg.bench[k]] + [
        f"with-{p}" for p in cfg.bench.peers
    ]
    name = "-".join([f"{'sweep-' if cfg.bench.sweep else ''}{cfg.workload.kind}", label, *extras])
    return _fit(name + _job_suffix())


# File names are limited to 255 bytes; the results add a lock prefix, `@<hash>` and a suffix.
MAX_NAME = 200


def _fit(name: str) -> str:
    """A name too long for the file system: its head and a hash of the whole (the table's
    title and command still say every row)."""
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name.encode()[: MAX_NAME - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _job_suffix() -> str:
    """Under -m, each job's own overrides name its results, so jobs never overwrite each other."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # called outside a Hydra app
        return ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    return "@" + re.sub(r"[^\w=,+-]+", "_", hc.job.override_dirname)
