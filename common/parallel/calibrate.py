"""This machine as the planner's hardware, measured: what a CPU rank achieves, not its peaks.

A run of W ranks on one CPU gives each rank cores / W threads, and the ranks share the memory
bus, so W processes measure at once, each with its share of the threads, and the slowest
rank's figures stand for all (every collective waits for it):
- memory bandwidth as decode sees it: batch-1 matmuls over the weight matrices of a decode
  step, in its order, together larger than the caches (bytes / median time, less the same
  calls' dispatch time);
- compute: the same matmuls on `rows` rows (FLOPs / median time);
- the link: bandwidth from a large all-reduce against a small one, back to back (the ring
  formula of simulate.py), through the collectives the recipe's ranks use (collectives.py:
  shared memory up to `shm_bytes`, else gloo); latency as a forward sees it: each all-reduce
  of one token's hidden state follows the slice of a layer's matmuls that precedes it in the model (attention, then
  MLP), averaged over many, less the slices alone. Back-to-back calls on idle ranks would read
  low: in a forward, ranks arrive at different times and gloo's threads must wake.
The per-layer overhead (what a forward costs beyond its math) depends on the model code,
so the caller measures it (scripts/plan_validate.py times a narrow copy of the model).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.parallel.collectives import Collectives
from common.parallel.hardware import DTYPE_NAMES, Hardware, Link
from common.parallel.launch import bind_cpu_rank

SMALL, LARGE = 4 << 10, 4 << 20  # all-reduce message bytes: latency-bound, bandwidth-bound


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _best(fn, repeats: int) -> float:
    return min(_times(fn, repeats))


def _median(fn, repeats: int) -> float:
    """What a run sees: on a shared VM the best pass reads 5-15% faster than the typical one."""
    return statistics.median(_times(fn, repeats))


def measure_matmuls(
    shapes: list[tuple[int, int]], dtype: torch.dtype, rows: int, min_bytes: int, repeats: int = 9
) -> tuple[float, float]:
    """(bytes/s at one row, FLOP/s at `rows` rows) of F.linear over weights of `shapes`
    ([out, in]), the matmuls a decode step runs in its order (every layer's, then the head's),
    so each shape weighs what it weighs in the model: small matrices stream slower than large
    ones, and a set of one layer and the head would be mostly head. Repeated until they hold
    min_bytes, so a pass reads memory, not cache. FLOP/s: one step's matmuls at `rows` rows,
    each weight once (a weight hot in cache would hide the memory traffic of its packing)."""
    per_set = sum(n * k for n, k in shapes) * dtype.itemsize
    copies = max(1, -(-min_bytes // per_set))
    weights = [torch.randn(n, k).to(dtype) for _ in range(copies) for n, k in shapes]
    k_in = {w.shape[1]: None for w in weights}
    xs = {k: torch.randn(1, k).to(dtype) for k in k_in}
    xr = {k: torch.randn(rows, k).to(dtype) for k in k_in}
    # The same number of calls on 8-row weights: the per-call dispatch cost, which the
    # caller's per-layer overhead already holds, comes off the reading time.
    stubs = [torch.randn(8, w.shape[1]).to(dtype) for w in weights]
    with torch.no_grad():
        t_read = _median(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], repeats)
        t_calls = _median(lambda: [F.linear(xs[w.shape[1]], w) for w in stubs], repeats)
        # one step's weights: each read from memory, as a prefill reads them
        step = weights[: len(shapes)]
        t_rows = _median(lambda: [F.linear(xr[w.shape[1]], w) for w in step], repeats)
    flops = 2 * rows * sum(n * k for n, k in shapes)
    return copies * per_set / max(t_read - t_calls, 1e-9), flops / t_rows


def _mean(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure_link(
    comm: Collectives,
    segments: list[Callable[[], object]],
    message: torch.Tensor,
    repeats: int = 100,
) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s per hop) of this process group's ring all-reduce; the
    latency of `message` all-reduced after each of `segments` (a rank's work between two
    collectives), in the mean, less the segments alone."""
    world = comm.world
    hops = 2 * (world - 1)
    small, large = torch.zeros(SMALL // 4), torch.zeros(LARGE // 4)
    dist.barrier()
    t_small = _best(lambda: comm.all_reduce(small), 20)
    t_large = _best(lambda: comm.all_reduce(large), 5)
    bandwidth = (world - 1) / world * 2 * LARGE / max(t_large - t_small, 1e-9)
    t_work = _mean(lambda: [seg() for seg in segments], repeats)
    t_both = _mean(lambda: [(seg(), comm.all_reduce(message)) for seg in segments], repeats)
    return bandwidth, max(t_both - t_work, 0.0) / (len(segments) * hops)


def _segments(
    groups: list[list[tuple[int, int]]], dtype: torch.dtype
) -> list[Callable[[], object]]:
    """Batch-1 F.linear over each group's weights ([out, in] shapes), one callable per group."""
    weights = [[torch.randn(n, k).to(dtype) for n, k in g] for g in groups]
    xs = {k: torch.randn(1, k).to(dtype) for g in groups for _, k in g}
    return [partial(lambda ws: [F.linear(xs[w.shape[1]], w) for w in ws], ws) for ws in weights]


def _rank(rank: int, world: int, port: int, job: dict, out: str) -> None:
    bind_cpu_rank(rank, world)  # as the recipe's ranks run (launch.init_distributed)
    torch.set_num_threads(job["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dist.barrier()  # every rank measures at once: they share the memory bus
        bw, flops = measure_matmuls(
            [tuple(s) for s in job["shapes"]],
            getattr(torch, job["dtype"]),
            job["rows"],
            job["min_bytes"],
        )
        dtype = getattr(torch, job["dtype"])
        with torch.no_grad():
            segments = _segments([[tuple(s) for s in g] for g in job["segments"]], dtype)
            comm = Collectives(None, "cpu", job["shm_bytes"])
            link = measure_link(comm, segments, torch.zeros(1, job["hidden"], dtype=dtype))
        # A step waits at every collective for its slowest rank: plan with that rank's speed.
        speeds: list = [None] * world
        dist.all_gather_object(speeds, (bw, flops))
        if rank == 0:
            bw, flops = min(b for b, _ in speeds), min(f for _, f in speeds)
            Path(out).write_text(json.dumps({"mem_bw": bw, "flops": flops, "link": link}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calibrate(
    world: int,
    shapes: list[tuple[int, int]],
    dtype: torch.dtype,
    layer_overhead: float,
    segments: list[list[tuple[int, int]]],
    hidden: int,
    rows: int = 256,
    min_bytes: int = 256 << 20,
    cores: int | None = None,
    shm_bytes: int = 0,
) -> Hardware:
    """This CPU as `world` devices of cores / world threads each, measured. shapes: one
    rank's matmuls ([out, in]) in a decode step, in order, for bandwidth and FLOP/s;
    segments: the matmuls a rank runs between two all-reduces of a [1, hidden] activation (a
    layer's attention, then its MLP); shm_bytes: the ranks' parallel.shm_mb in bytes (0: gloo
    only)."""
    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // world)
    job = dict(
        shapes=shapes,
        dtype=str(dtype).removeprefix("torch."),
        rows=rows,
        min_bytes=min_bytes,
        threads=threads,
        segments=segments,
        hidden=hidden,
        shm_bytes=shm_bytes,
    )
    if world == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            bw, flops = measure_matmuls(shapes, dtype, rows, min_bytes)
        finally:
            torch.set_num_threads(previous)
        link = (float("inf"), 0.0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "calibration.json")
            mp.spawn(_rank, args=(world, _free_port(), job, out), nprocs=world, join=True)
            result = json.loads(Path(out).read_text())
        bw, flops, link = result["mem_bw"], result["flops"], tuple(result["link"])
    return Hardware(
        name=f"this cpu as {world} rank{'s' * (world > 1)} x {threads} thread{'s' * (threads > 1)}",
        devices_per_node=world,
        nodes=1,
        memory=_host_memory() // world,
        flops={DTYPE_NAMES[dtype]: flops},
        mem_bw=bw,
        intra=Link(*link),
        inter=Link(*link),
        layer_overhead=layer_overhead,
        notes=[
            f"measured: {bw / 1e9:.1f} GB/s batch-1 matmul reads, {flops / 1e9:.0f} GFLOP/s at "
            f"{rows} rows, all-reduce {link[0] / 1e9:.2f} GB/s + {1e6 * link[1]:.0f} us per hop, "
            f"{1e6 * layer_overhead:.0f} us per layer"
        ],
    )


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
